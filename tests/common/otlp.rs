//! An OTLP/gRPC trace receiver for the tests: the collector's trace service as
//! opentelemetry-proto generates it, on loopback, keeping every request decoded; stopped when
//! dropped. (No OpenTelemetry Collector can be installed here: its builds are Go, and the
//! machine has no Go toolchain.)

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::{any_value::Value, KeyValue},
    trace::v1::Span,
};

#[derive(Clone, Default)]
struct Kept(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Kept {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

pub struct Receiver {
    pub addr: SocketAddr,
    kept: Kept,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    /// Listens on a free loopback port; returns once it accepts connections.
    pub fn start() -> Receiver {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port");
        let kept = Kept::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = TraceServiceServer::new(kept.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("a runtime for the OTLP receiver");
            rt.block_on(async {
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_shutdown(addr, async {
                        let _ = stopped.await;
                    })
                    .await
                    .expect("the OTLP receiver serves");
            });
        });
        let begun = Instant::now();
        while TcpStream::connect(addr).is_err() {
            assert!(
                begun.elapsed() < Duration::from_secs(10),
                "the OTLP receiver did not listen on {addr} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Receiver {
            addr,
            kept,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received, with its resource's `host.name`.
    pub fn spans(&self) -> Vec<(String, Span)> {
        let requests = self.kept.0.lock().unwrap();
        let mut spans = Vec::new();
        for rs in requests.iter().flat_map(|r| &r.resource_spans) {
            let host = (rs.resource.iter())
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "host.name")
                .and_then(text)
                .unwrap_or_default();
            for ss in &rs.scope_spans {
                spans.extend(ss.spans.iter().map(|s| (host.clone(), s.clone())));
            }
        }
        spans
    }
}

/// A span's string or integer attribute, as text.
pub fn attribute(s: &Span, key: &str) -> Option<String> {
    s.attributes.iter().find(|a| a.key == key).and_then(text)
}

fn text(a: &KeyValue) -> Option<String> {
    match a.value.as_ref()?.value.as_ref()? {
        Value::StringValue(v) => Some(v.clone()),
        Value::IntValue(v) => Some(v.to_string()),
        other => Some(format!("{other:?}")),
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
