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
}
