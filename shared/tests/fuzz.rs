//! Bounded fuzzing of the envelope decoder: any bytes off the bus decode to
//! an envelope or an error, and opening one as any type never panics.

use proptest::prelude::*;
use prost::Message;
use pushbus_shared::envelope::{self, EventMeta};
use pushbus_shared::proto::{AgentPoke, Envelope, GitPushEvent, RefHead};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn any_bytes_decode_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        if let Ok(env) = envelope::decode(&bytes) {
            let _ = envelope::open::<GitPushEvent>(&env);
            let _ = envelope::open::<AgentPoke>(&env);
            let _ = envelope::open::<RefHead>(&env);
            let _ = EventMeta::from(&env);
        }
    }

    #[test]
    fn a_sealed_envelope_with_a_mangled_payload_never_panics(
        payload in proptest::collection::vec(any::<u8>(), 0..512),
        type_url in ".{0,80}",
        flip in any::<(usize, u8)>(),
    ) {
        let mut env = Envelope {
            type_url,
            payload,
            ..Default::default()
        };
        let _ = envelope::open::<GitPushEvent>(&env);
        env.type_url = "type.googleapis.com/pushbus.v1.GitPushEvent".into();
        let _ = envelope::open::<GitPushEvent>(&env);
        let mut bytes = env.encode_to_vec();
        if !bytes.is_empty() {
            let i = flip.0 % bytes.len();
            bytes[i] ^= flip.1;
        }
        if let Ok(env) = envelope::decode(&bytes) {
            let _ = envelope::open::<GitPushEvent>(&env);
        }
    }
}
