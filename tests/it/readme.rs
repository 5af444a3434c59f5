//! README's flag table against the flags `pushbus run` really has: every
//! flag listed, under its variable, with the default it really takes, so
//! the table a user configures from cannot drift from the binary.

use std::collections::BTreeMap;

use crate::compose::run_help;

/// A flag as `pushbus run --help` prints it.
#[derive(Debug)]
struct Flag {
    env: Option<String>,
    default: Option<String>,
}

/// Every `--flag` of `pushbus run --help`: its variable and default.
fn help_flags() -> BTreeMap<String, Flag> {
    let help = run_help();
    let mut flags = BTreeMap::new();
    let mut lines = help.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(name) = line.trim_start().strip_prefix("--") else {
            continue;
        };
        let name = name.split([' ', '<']).next().unwrap().to_owned();
        let mut text = String::new();
        while let Some(next) = lines.next_if(|l| !l.trim_start().starts_with('-')) {
            text.push_str(next);
        }
        let bracket = |key: &str| {
            let start = text.find(&format!("[{key}: "))? + key.len() + 3;
            let end = start + text[start..].find(']')?;
            Some(text[start..end].trim_end_matches('=').to_owned())
        };
        let flag = Flag {
            env: bracket("env"),
            default: bracket("default"),
        };
        flags.insert(name, flag);
    }
    flags
}

/// A default as README writes it ("8 MiB", "8 days", "`127.0.0.1:8080`",
/// "1000"), as the flag's value; `None` for words ("none", "off", ...).
fn readme_value(text: &str) -> Option<String> {
    let text = text.trim();
    if let Some(quoted) = text.strip_prefix('`') {
        return Some(quoted.split('`').next()?.to_owned());
    }
    let mut words = text.split([' ', ':', '(']).filter(|w| !w.is_empty());
    let number: f64 = words.next()?.parse().ok()?;
    let unit = match words.next() {
        Some("KiB") => 1024.0,
        Some("MiB") => 1024.0 * 1024.0,
        Some("GiB") => 1024.0 * 1024.0 * 1024.0,
        Some("days") => 24.0 * 3600.0,
        _ => 1.0,
    };
    Some((number * unit).to_string())
}

/// Whether `clap`'s default and README's value say the same.
fn same_value(clap: &str, readme: &str) -> bool {
    match (clap.parse::<f64>(), readme.parse::<f64>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => clap == readme,
    }
}

/// One row of README's table: its flags, variables and default texts, each
/// as written (`--notifier-…` and `_SUFFIX` shorthands still in).
struct Row {
    line: String,
    flags: Vec<String>,
    envs: Vec<String>,
    defaults: Vec<String>,
}

fn readme_rows() -> Vec<Row> {
    let readme = crate::compose::repo_file("README.md");
    let table = readme
        .split("| flag | env | default |")
        .nth(1)
        .expect("README has no flag table");
    let backticked = |cell: &str| -> Vec<String> {
        cell.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    };
    table
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|line| {
            let cells: Vec<&str> = line.split(" | ").collect();
            let flags: Vec<String> = backticked(cells[0])
                .into_iter()
                .filter(|f| f.starts_with("--"))
                .collect();
            let envs = backticked(cells[1]);
            let defaults = cells[2]
                .trim_end_matches(" |")
                .split(" / ")
                .map(str::to_owned)
                .collect();
            Row {
                line: line.to_owned(),
                flags,
                envs,
                defaults,
            }
        })
        .collect()
}

/// The row's flags with `--notifier-…` spelled out (the previous flag,
/// notifier's instead of ingest's).
fn spelled_out(row: &Row) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for f in &row.flags {
        match f.strip_suffix('…') {
            Some(prefix) => {
                let previous = out.last().expect("a shorthand follows a flag");
                let rest = previous.strip_prefix("--ingest-").expect("an ingest flag");
                out.push(format!("{prefix}{rest}"));
            }
            None => out.push(f.clone()),
        }
    }
    out
}

#[test]
fn readmes_flag_table_lists_every_flag_with_its_variable_and_default() {
    let help = help_flags();
    let mut listed = Vec::new();
    for row in readme_rows() {
        let flags = spelled_out(&row);
        assert!(!flags.is_empty(), "a row without a flag: {}", row.line);
        for (i, name) in flags.iter().enumerate() {
            let flag = help
                .get(name.trim_start_matches("--"))
                .unwrap_or_else(|| panic!("README lists {name}, which `pushbus run` lacks"));
            listed.push(name.trim_start_matches("--").to_owned());
            let env = flag.env.as_deref().expect("every flag has a variable");
            let written = row.envs.get(i).or(row.envs.first()).unwrap();
            let matches = if let Some(base) = written.strip_suffix('…') {
                env.starts_with(base)
            } else if written.starts_with('_') {
                env.ends_with(written.as_str())
            } else {
                env == written
            };
            assert!(
                matches,
                "{name} reads {env}; README says {written}: {}",
                row.line
            );
            let text = row.defaults.get(i).or(row.defaults.first()).unwrap();
            match (&flag.default, readme_value(text)) {
                (Some(clap), Some(readme)) => assert!(
                    same_value(clap, &readme),
                    "{name} defaults to {clap}; README says {text:?}"
                ),
                (Some(clap), None) => panic!("{name} defaults to {clap}; README says {text:?}"),
                (None, Some(readme)) => {
                    panic!("{name} has no default; README says {readme} ({text:?})")
                }
                (None, None) => {}
            }
        }
    }
    let missing: Vec<&String> = help.keys().filter(|f| !listed.contains(f)).collect();
    assert!(
        missing.is_empty(),
        "not in README's flag table: {missing:?}"
    );
}
