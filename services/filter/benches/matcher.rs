//! Micro-benchmarks of the filter's matching, each beside its baseline:
//! the index lookup against the naive linear scan over every watch
//! (`matches_by_scan`), and our segment glob against globset's compiled
//! (regex) matcher it stands in for. `cargo bench -p pushbus-filter`.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use pushbus_filter::agent;
use pushbus_filter::glob::Glob;
use pushbus_filter::index::{Index, matches_by_scan};
use pushbus_shared::proto::{
    AgentConfig, GitPushEvent, RefChange, RefKind, RefSelector, Watch, WatchKind,
    ref_selector::Kind,
};
use std::hint::black_box;

const WATCHES: usize = 5;

/// Agent `a`'s watches: projects 1 + a*5 .. 1 + a*5+5, branch and path globs.
fn config(a: usize) -> AgentConfig {
    let watches = (0..WATCHES)
        .map(|w| Watch {
            project_id: (1 + a * WATCHES + w) as i64,
            refs: Some(RefSelector {
                kind: if w % 2 == 0 {
                    Kind::BranchGlob
                } else {
                    Kind::AnyBranch
                } as i32,
                pattern: if w % 2 == 0 {
                    "release/*".into()
                } else {
                    String::new()
                },
            }),
            paths: if w % 3 == 0 {
                vec!["deploy/**".into(), "charts/*/values.yaml".into()]
            } else {
                Vec::new()
            },
            kind: WatchKind::Gitops as i32,
            ..Default::default()
        })
        .collect();
    AgentConfig {
        agent_id: format!("agent-{a}"),
        watches,
        public: true,
        ..Default::default()
    }
}

fn index(agents: usize) -> Index {
    let mut index = Index::default();
    for a in 0..agents {
        let watches = agent::compile(&config(a)).expect("bench config compiles");
        index.put(&format!("agent-{a}"), watches);
    }
    index
}

/// A push to a watched project: one branch, a few changed paths.
fn push(project: i64) -> GitPushEvent {
    GitPushEvent {
        project_id: project,
        project_path: format!("group/project-{project}"),
        changes: vec![RefChange {
            r#ref: "refs/heads/release/1.2".into(),
            ref_kind: RefKind::Branch as i32,
            changed_paths: vec![
                "deploy/prod/app.yaml".into(),
                "src/main.rs".into(),
                "charts/web/values.yaml".into(),
            ],
            paths_known: true,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("lookup");
    for agents in [1_000, 10_000] {
        let index = index(agents);
        let pushes: Vec<GitPushEvent> = (0..64)
            .map(|i| push((1 + (i * 7919) % (agents * WATCHES)) as i64))
            .collect();
        // The same answers, or the comparison means nothing.
        for p in &pushes {
            assert_eq!(index.matches(p).len(), matches_by_scan(&index, p).len());
        }
        let mut i = 0;
        group.bench_with_input(BenchmarkId::new("index", agents), &index, |b, index| {
            b.iter(|| {
                i = (i + 1) % pushes.len();
                black_box(index.matches(black_box(&pushes[i])))
            })
        });
        group.bench_with_input(
            BenchmarkId::new("linear scan", agents),
            &index,
            |b, index| {
                b.iter(|| {
                    i = (i + 1) % pushes.len();
                    black_box(matches_by_scan(index, black_box(&pushes[i])))
                })
            },
        );
    }
    group.finish();
}

fn glob(c: &mut Criterion) {
    let mut group = c.benchmark_group("glob");
    let paths = [
        "deploy/prod/eu/app.yaml",
        "src/very/deep/tree/of/modules/lib.rs",
        "charts/web/values.yaml",
        "README.md",
    ];
    for pattern in ["deploy/**", "charts/*/values.yaml", "**/*.yaml"] {
        let ours = Glob::new(pattern).expect("valid glob");
        let regex = globset::GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()
            .expect("valid glob")
            .compile_matcher();
        for p in paths {
            assert_eq!(ours.is_match(p), regex.is_match(p), "{pattern} on {p}");
        }
        group.bench_function(BenchmarkId::new("segment glob", pattern), |b| {
            b.iter(|| paths.iter().filter(|p| ours.is_match(black_box(p))).count())
        });
        group.bench_function(BenchmarkId::new("globset regex", pattern), |b| {
            b.iter(|| {
                paths
                    .iter()
                    .filter(|p| regex.is_match(black_box(p)))
                    .count()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, lookup, glob);
criterion_main!(benches);
