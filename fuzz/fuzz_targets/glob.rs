#![no_main]
//! A glob pattern and paths (split at the first NUL byte, then at newlines).

use libfuzzer_sys::fuzz_target;
use pushbus_filter::glob::Glob;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (pattern, paths) = text.split_once('\0').unwrap_or((text, ""));
    // The registry refuses longer patterns before they are compiled.
    if pattern.len() > 1024 {
        return;
    }
    if let Ok(glob) = Glob::new(pattern) {
        for p in paths.split('\n') {
            let _ = glob.is_match(p);
        }
    }
});
