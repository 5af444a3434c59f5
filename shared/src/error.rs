//! An error as one line for a person: its message, then each cause that
//! adds something. Many errors (async-nats', io's wrappers) already repeat
//! their source in their own message, and printing the chain as-is would
//! say "connection refused" three times.

use std::error::Error;
use std::process::ExitCode;

/// `err` and its causes, `": "`-separated, each cause left out when the line
/// already holds its text.
pub fn one_line(err: &dyn Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

/// A binary's exit: success, or failure after `Error: <one line>` on
/// stderr. Never a backtrace, even with RUST_BACKTRACE set: resolving one
/// takes seconds (which a hook's --timeout-ms does not allow) and means
/// nothing to a pusher or an operator.
pub fn exit_code(failure: Option<impl Error>) -> ExitCode {
    match failure {
        None => ExitCode::SUCCESS,
        Some(err) => {
            eprintln!("Error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{what}")]
    struct Layer {
        what: String,
        #[source]
        source: Option<Box<Layer>>,
    }

    fn layer(what: &str, source: Option<Layer>) -> Layer {
        Layer {
            what: what.into(),
            source: source.map(Box::new),
        }
    }

    #[test]
    fn causes_are_joined_once_each() {
        let refused = layer("connection refused", None);
        // The middle layer already quotes its cause, as async-nats' errors do.
        let io = layer("IO error: connection refused", Some(refused));
        let top = layer("cannot connect to nats://x:1", Some(io));
        assert_eq!(
            one_line(&top),
            "cannot connect to nats://x:1: IO error: connection refused"
        );
    }

    #[test]
    fn a_cause_hidden_in_a_source_is_shown() {
        let top = layer("error sending request", Some(layer("timed out", None)));
        assert_eq!(one_line(&top), "error sending request: timed out");
    }
}
