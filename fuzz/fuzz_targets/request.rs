//! The request-validation path: arbitrary bytes as an OpenAI completions or chat body (JSON)
//! and as a protobuf `rrt.v1.GenerateRequest`, through conversion and validation: an error
//! naming a field, or a request whose every value is in range — never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let checked = match sel % 3 {
        0 => rrt_coordinator::http::validate_body(false, rest),
        1 => rrt_coordinator::http::validate_body(true, rest),
        _ => match rrt_proto::v1::GenerateRequest::decode(rest) {
            Ok(r) => rrt_coordinator::grpc::to_gen_request(r).and_then(|g| g.validate().map(|_| g)),
            Err(_) => return,
        },
    };
    match checked {
        Ok(g) => {
            assert!(g.temperature.is_finite() && g.temperature >= 0.0);
            assert!(g.top_p > 0.0 && g.top_p <= 1.0);
            assert!((0.0..=1.0).contains(&g.min_p));
            assert!(g.max_new_tokens != Some(0));
            assert!(g.top_logprobs <= rrt_coordinator::request::MAX_TOP_LOGPROBS);
        }
        Err(e) => {
            let _ = e.to_string();
            let _ = (e.code(), e.http_status(), e.param());
        }
    }
});
