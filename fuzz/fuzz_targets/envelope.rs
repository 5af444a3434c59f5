#![no_main]
//! Bytes off the bus through the envelope decoder and `open`.

use libfuzzer_sys::fuzz_target;
use pushbus_shared::envelope;
use pushbus_shared::proto::{AgentPoke, GitPushEvent, RefHead};

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = envelope::decode(data) {
        let _ = envelope::open::<GitPushEvent>(&env);
        let _ = envelope::open::<AgentPoke>(&env);
        let _ = envelope::open::<RefHead>(&env);
        let _ = pushbus_shared::EventMeta::from(&env);
    }
});
