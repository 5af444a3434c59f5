#![no_main]
//! The agent file format, YAML and JSON, through to a compiled config.

use libfuzzer_sys::fuzz_target;
use pushbus_filter::agent;
use pushbus_filter::file::AgentFile;

fn check(file: AgentFile) {
    if let Ok(cfg) = file.into_config() {
        let _ = agent::compile(&cfg);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = AgentFile::from_json(data) {
        check(file);
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(file) = AgentFile::from_yaml(text)
    {
        check(file);
    }
});
