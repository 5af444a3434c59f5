#![no_main]
//! post_receive bodies as the HTTP door parses them, and the text sanitizer.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pushbus_hook_ingest::http::parse_post_receive(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let clean = pushbus_hook_ingest::terminal::sanitize(text);
        assert!(!clean.chars().any(char::is_control));
    }
});
