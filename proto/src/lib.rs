//! Protobuf definitions and generated tonic code: `rrt.v1` (the client `Generation` service,
//! `proto/rrt/v1/generate.proto`) and `rrt.v1.node` (the internal `Node` service,
//! `proto/rrt/v1/node.proto`). Generated code stays inside this crate (built by `build.rs`,
//! never committed); other crates convert at their edges and keep prost types out of their
//! internals.

#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("rrt.v1");

    pub mod node {
        tonic::include_proto!("rrt.v1.node");
    }
}

/// Typed refusals of the node protocol, carried as gRPC metadata (so nobody matches error
/// message strings).
pub mod refusal {
    /// The metadata key of a refusal's kind.
    pub const KEY: &str = "rrt-refusal";

    /// Why a node refused a call while healthy.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Refusal {
        /// The node is draining: it takes no new requests; route the request elsewhere.
        Draining,
    }

    impl Refusal {
        pub fn as_str(self) -> &'static str {
            match self {
                Refusal::Draining => "draining",
            }
        }

        /// The status a node answers with.
        pub fn status(self, message: &str) -> tonic::Status {
            let mut s = tonic::Status::unavailable(message.to_string());
            s.metadata_mut()
                .insert(KEY, tonic::metadata::MetadataValue::from_static(self.as_str()));
            s
        }

        /// The refusal a status carries, if any.
        pub fn of(status: &tonic::Status) -> Option<Refusal> {
            match status.metadata().get(KEY)?.to_str().ok()? {
                "draining" => Some(Refusal::Draining),
                _ => None,
            }
        }
    }
}

/// The encoded `FileDescriptorSet` of both services, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/rrt_descriptor.bin"));

#[cfg(test)]
mod tests {
    use super::v1;
    use prost::Message;

    #[test]
    fn descriptor_set_holds_both_services() {
        let fds = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let services: Vec<(String, String)> = fds
            .file
            .iter()
            .flat_map(|f| {
                f.service
                    .iter()
                    .map(move |s| (f.package().to_string(), s.name().to_string()))
            })
            .collect();
        assert!(services.contains(&("rrt.v1".into(), "Generation".into())));
        assert!(services.contains(&("rrt.v1.node".into(), "Node".into())));
    }

    #[test]
    fn messages_round_trip() {
        let req = v1::GenerateRequest {
            input: Some(v1::generate_request::Input::Chat(v1::Chat {
                messages: vec![v1::ChatMessage {
                    role: "user".into(),
                    content: "Hi".into(),
                }],
            })),
            max_new_tokens: Some(8),
            temperature: Some(0.0),
            stop: vec!["\n\n".into()],
            depth: Some(v1::DepthControls {
                full_depth: false,
                exit_threshold: Some(0.9),
                max_loops: Some(2),
                prompt_exits: Some(true),
            }),
            ..Default::default()
        };
        let bytes = req.encode_to_vec();
        assert_eq!(v1::GenerateRequest::decode(bytes.as_slice()).unwrap(), req);
        let ev = v1::node::RunEvent {
            event: Some(v1::node::run_event::Event::Token(v1::node::Token {
                token_id: 7,
                text: "a".into(),
                logprob: -0.5,
                exit_loop: 1,
                top_logprobs: vec![],
                token: "a".into(),
            })),
        };
        assert_eq!(v1::node::RunEvent::decode(ev.encode_to_vec().as_slice()).unwrap(), ev);
    }

    #[test]
    fn refusals_round_trip_through_a_status() {
        use super::refusal::Refusal;
        let s = Refusal::Draining.status("the node is draining");
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(Refusal::of(&s), Some(Refusal::Draining));
        // A message saying "draining" is not a refusal: only the typed key is.
        assert_eq!(Refusal::of(&tonic::Status::unavailable("draining")), None);
    }
}
