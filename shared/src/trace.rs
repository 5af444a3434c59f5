//! W3C trace context across NATS: inject from the current span on publish,
//! extract and continue on consume. async-nats has nothing built in.

use async_nats::HeaderMap;
use async_nats::header::HeaderName;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::names::headers;
use crate::proto::TraceContext;

/// What the propagator writes, kept as it comes (no scratch header map).
#[derive(Default)]
struct Captured {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Injector for Captured {
    fn set(&mut self, key: &str, value: String) {
        match key {
            headers::TRACEPARENT => self.traceparent = Some(value),
            headers::TRACESTATE => self.tracestate = Some(value),
            _ => {}
        }
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        vec![headers::TRACEPARENT, headers::TRACESTATE]
    }
}

/// Adds OpenTelemetry's messaging attributes to `span`, when spans are
/// exported. They repeat what pushbus's own fields say (`event_id`,
/// `correlation_id`, `subject`, `consumer`) under the conventions' names,
/// and a span's fields cost on every span, exported or not: each is
/// formatted for the log lines inside it and recorded as an attribute.
pub fn exported_attributes<const N: usize>(
    span: &tracing::Span,
    attributes: impl FnOnce() -> [(&'static str, String); N],
) {
    if crate::telemetry::exporting() {
        for (key, value) in attributes() {
            span.set_attribute(key, value);
        }
    }
}

/// Writes the current span's trace context into `headers` and returns it for
/// the envelope. Returns `None` when there is no active trace (no
/// OpenTelemetry layer installed), in which case nothing is written.
pub fn inject_current(map: &mut HeaderMap) -> Option<TraceContext> {
    let trace = current()?;
    map.insert(
        HeaderName::from_static(headers::TRACEPARENT),
        trace.traceparent.as_str(),
    );
    if !trace.tracestate.is_empty() {
        map.insert(
            HeaderName::from_static(headers::TRACESTATE),
            trace.tracestate.as_str(),
        );
    }
    Some(trace)
}

/// Makes `span` a child of the trace carried in `map`, if any.
pub fn continue_trace(span: &tracing::Span, map: Option<&HeaderMap>) {
    let Some(map) = map else { return };
    if map.get(headers::TRACEPARENT).is_none() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(map));
    // Fails only when the span is disabled; nothing to continue then.
    let _ = span.set_parent(cx);
}

/// Makes `span` a child of the W3C trace context `get` finds (HTTP headers,
/// gRPC metadata), so a caller's trace (GitLab's) continues into pushbus.
pub fn continue_from<'a>(span: &tracing::Span, get: impl Fn(&str) -> Option<&'a str>) {
    struct Pair<'a> {
        traceparent: &'a str,
        tracestate: Option<&'a str>,
    }
    impl Extractor for Pair<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            match key {
                headers::TRACEPARENT => Some(self.traceparent),
                headers::TRACESTATE => self.tracestate,
                _ => None,
            }
        }
        fn keys(&self) -> Vec<&str> {
            vec![headers::TRACEPARENT, headers::TRACESTATE]
        }
    }
    let Some(traceparent) = get(headers::TRACEPARENT) else {
        return;
    };
    let pair = Pair {
        traceparent,
        tracestate: get(headers::TRACESTATE),
    };
    let cx = TraceContextPropagator::new().extract(&pair);
    let _ = span.set_parent(cx);
}

/// Makes `span` a child of a trace context stored with a message (the
/// envelope's, or a ref head's).
pub fn continue_stored(span: &tracing::Span, trace: Option<&TraceContext>) {
    let Some(t) = trace.filter(|t| !t.traceparent.is_empty()) else {
        return;
    };
    continue_from(span, |k| match k {
        headers::TRACEPARENT => Some(t.traceparent.as_str()),
        headers::TRACESTATE if !t.tracestate.is_empty() => Some(t.tracestate.as_str()),
        _ => None,
    });
}

/// The current span's trace context, for storing with a message; `None`
/// without an active trace.
pub fn current() -> Option<TraceContext> {
    let mut captured = Captured::default();
    TraceContextPropagator::new()
        .inject_context(&tracing::Span::current().context(), &mut captured);
    Some(TraceContext {
        traceparent: captured.traceparent?,
        tracestate: captured.tracestate.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn consumer_span_continues_the_publishers_trace() {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let publish = tracing::info_span!("publish");
            let mut map = HeaderMap::new();
            let injected = publish
                .in_scope(|| inject_current(&mut map))
                .expect("a trace context");
            let publisher_trace = publish.context().span().span_context().trace_id();
            assert!(injected.traceparent.contains(&publisher_trace.to_string()));
            assert_eq!(
                map.get(headers::TRACEPARENT).unwrap().as_str(),
                injected.traceparent
            );

            let consume = tracing::info_span!("handle");
            continue_trace(&consume, Some(&map));
            assert_eq!(
                consume.context().span().span_context().trace_id(),
                publisher_trace
            );
        });
    }

    #[test]
    fn nothing_injected_without_a_trace() {
        let mut map = HeaderMap::new();
        assert!(inject_current(&mut map).is_none());
        assert!(map.get(headers::TRACEPARENT).is_none());
    }
}
