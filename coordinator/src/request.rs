//! The coordinator's own request and event types: both front doors (gRPC `rrt.v1` and the
//! OpenAI HTTP API) convert into [`GenRequest`] and out of [`GenEvent`]; prost types stay at
//! the edges.

use crate::error::CoordError;

/// Most alternatives per token a request may ask for.
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Most stop strings, and their longest length in bytes.
pub const MAX_STOPS: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;

/// What to generate from.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// Raw text, tokenized with the model's BOS rule and no chat template.
    Prompt(String),
    /// (role, content) messages; the model's chat template is applied.
    Chat(Vec<(String, String)>),
}

/// One generation request, validated by [`GenRequest::validate`].
#[derive(Clone, Debug, PartialEq)]
pub struct GenRequest {
    /// Caller's id (empty: the coordinator makes one).
    pub id: String,
    /// The served model that answers (empty: the default model).
    pub model: String,
    pub input: Input,
    /// `None`: up to the model's context.
    pub max_new_tokens: Option<u32>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// Alternatives per token (0..=20); the chosen token's logprob always comes.
    pub top_logprobs: u32,
    pub ignore_eos: bool,
    pub full_depth: bool,
    pub exit_threshold: Option<f32>,
    pub max_loops: Option<u32>,
    /// Prompt tokens take the exit test too (`None`: the node's setting).
    pub prompt_exits: Option<bool>,
    /// When the request must be over (gRPC `grpc-timeout`, HTTP `timeout`): past it the
    /// client gets DEADLINE_EXCEEDED / 504 and the node frees the request.
    pub deadline: Option<std::time::Instant>,
    /// The caller's W3C trace context: the request's span becomes a child of the caller's.
    pub trace: rrt_telemetry::propagate::TraceHeaders,
}

impl GenRequest {
    /// Greedy, 256 tokens, no penalties: the defaults of `rrt.v1.GenerateRequest`.
    pub fn new(input: Input) -> Self {
        Self {
            id: String::new(),
            model: String::new(),
            input,
            max_new_tokens: Some(256),
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            top_logprobs: 0,
            ignore_eos: false,
            full_depth: false,
            exit_threshold: None,
            max_loops: None,
            prompt_exits: None,
            deadline: None,
            trace: Default::default(),
        }
    }

    /// Checks every field; the error names the first bad one (in the wire's field names).
    pub fn validate(&self) -> Result<(), CoordError> {
        let bad = |f: &str, m: String| Err(CoordError::invalid(f, m));
        match &self.input {
            Input::Prompt(p) if p.is_empty() => return bad("prompt", "must not be empty".into()),
            Input::Chat(m) if m.is_empty() => return bad("messages", "at least one message is required".into()),
            Input::Chat(m) => {
                for (i, (role, _)) in m.iter().enumerate() {
                    if !matches!(role.as_str(), "system" | "user" | "assistant" | "developer" | "tool") {
                        return bad(
                            &format!("messages[{i}].role"),
                            format!("`{role}` is not one of system, user, assistant"),
                        );
                    }
                }
            }
            _ => {}
        }
        if self.max_new_tokens == Some(0) {
            return bad("max_new_tokens", "must be at least 1".into());
        }
        let finite = |f: &str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(CoordError::invalid(f, format!("{v} is not a finite number")))
            }
        };
        finite("temperature", self.temperature)?;
        finite("top_p", self.top_p)?;
        finite("min_p", self.min_p)?;
        finite("repetition_penalty", self.repetition_penalty)?;
        finite("presence_penalty", self.presence_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        if self.temperature < 0.0 {
            return bad("temperature", format!("{} is negative", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("{} is not in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("{} is not in [0, 1]", self.min_p));
        }
        if self.repetition_penalty <= 0.0 {
            return bad(
                "repetition_penalty",
                format!("{} is not positive", self.repetition_penalty),
            );
        }
        for (f, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(f, format!("{v} is not in [-2, 2]"));
            }
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return bad("logprobs", format!("{} is above {MAX_TOP_LOGPROBS}", self.top_logprobs));
        }
        if self.stop.len() > MAX_STOPS {
            return bad("stop", format!("{} stop strings; at most {MAX_STOPS}", self.stop.len()));
        }
        for (i, s) in self.stop.iter().enumerate() {
            if s.is_empty() || s.len() > MAX_STOP_BYTES {
                return bad(&format!("stop[{i}]"), format!("must be 1..={MAX_STOP_BYTES} bytes"));
            }
        }
        if let Some(t) = self.exit_threshold {
            finite("exit_threshold", t)?;
        }
        if self.max_loops == Some(0) {
            return bad("max_loops", "must be at least 1".into());
        }
        Ok(())
    }
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Length,
    Stop,
    Eos,
    Cancelled,
}

impl Finish {
    /// A node's finish reason as the client sees it (`Moved` is not an end for the client:
    /// the coordinator continues the request elsewhere, so it has no `Finish`).
    pub fn from_node(r: rrt_proto::v1::node::FinishReason) -> Option<Self> {
        use rrt_proto::v1::node::FinishReason as R;
        match r {
            R::Length => Some(Self::Length),
            R::Stop => Some(Self::Stop),
            R::Eos => Some(Self::Eos),
            R::Cancelled | R::Unspecified => Some(Self::Cancelled),
            R::Moved => None,
        }
    }

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Stop => "stop",
            Self::Eos => "eos",
            Self::Cancelled => "cancelled",
        }
    }

    /// OpenAI's `finish_reason` (an end-of-generation token is a "stop" there).
    pub fn openai(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Stop | Self::Eos => "stop",
            Self::Cancelled => "cancelled",
        }
    }
}

/// An alternative token.
#[derive(Clone, Debug, PartialEq)]
pub struct Alt {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
}

/// One generated token.
#[derive(Clone, Debug, PartialEq)]
pub struct GenToken {
    pub id: u32,
    /// Text that became final with this token (may be empty).
    pub text: String,
    /// The token's own text (for logprob listings).
    pub token_text: String,
    pub logprob: f32,
    pub exit_loop: u32,
    pub top: Vec<Alt>,
}

/// Usage of a finished request.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GenUsage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Mean loops per output token.
    pub mean_loops: f32,
}

/// What a generation streams.
#[derive(Clone, Debug, PartialEq)]
pub enum GenEvent {
    Token(GenToken),
    Done {
        finish: Finish,
        /// Text held back until the end.
        text: String,
        usage: GenUsage,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let ok = GenRequest::new(Input::Prompt("hi".into()));
        ok.validate().unwrap();
        type Edit = Box<dyn Fn(&mut GenRequest)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("prompt", Box::new(|r| r.input = Input::Prompt(String::new()))),
            ("messages", Box::new(|r| r.input = Input::Chat(vec![]))),
            (
                "messages[0].role",
                Box::new(|r| r.input = Input::Chat(vec![("robot".into(), "x".into())])),
            ),
            ("max_new_tokens", Box::new(|r| r.max_new_tokens = Some(0))),
            ("temperature", Box::new(|r| r.temperature = f32::NAN)),
            ("temperature", Box::new(|r| r.temperature = -1.0)),
            ("top_p", Box::new(|r| r.top_p = 0.0)),
            ("min_p", Box::new(|r| r.min_p = 1.5)),
            ("repetition_penalty", Box::new(|r| r.repetition_penalty = 0.0)),
            ("presence_penalty", Box::new(|r| r.presence_penalty = 3.0)),
            ("frequency_penalty", Box::new(|r| r.frequency_penalty = f32::INFINITY)),
            ("logprobs", Box::new(|r| r.top_logprobs = 21)),
            ("stop", Box::new(|r| r.stop = vec!["a".into(); 17])),
            ("stop[1]", Box::new(|r| r.stop = vec!["a".into(), String::new()])),
            ("exit_threshold", Box::new(|r| r.exit_threshold = Some(f32::NAN))),
            ("max_loops", Box::new(|r| r.max_loops = Some(0))),
        ];
        for (field, f) in cases {
            let mut r = ok.clone();
            f(&mut r);
            match r.validate() {
                Err(CoordError::InvalidArgument { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}
