//! Chat templates (Jinja, as shipped in `tokenizer.chat_template` / `tokenizer_config.json`)
//! rendered with minijinja, with the Python-compatible string methods templates expect.

use crate::error::{ModelError, Result};
use minijinja::{Environment, ErrorKind, context};
use serde::{Deserialize, Serialize};

/// One chat message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    pub source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("source", &self.source).finish()
    }
}

impl Clone for ChatTemplate {
    fn clone(&self) -> Self {
        Self::new(&self.source).expect("a template that compiled once compiles again")
    }
}

fn raise_exception(msg: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compiles a template; a syntax error is reported with its line.
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        // Hugging Face renders chat templates with trim_blocks and lstrip_blocks.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| ModelError::Template(e.to_string()))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use this for a "today" line; a fixed date keeps renders reproducible.
            fmt.replace("%d", "26")
                .replace("%b", "Nov")
                .replace("%B", "November")
                .replace("%Y", "2026")
                .replace("%m", "11")
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ModelError::Template(format!("{e:#}")))?;
        Ok(Self {
            env,
            source: source.to_string(),
        })
    }

    /// Renders the conversation; `add_generation_prompt` appends the assistant header.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        bos: Option<&str>,
        eos: Option<&str>,
    ) -> Result<String> {
        if messages.is_empty() {
            return Err(ModelError::InvalidArgument {
                field: "messages",
                msg: "at least one message is required".into(),
            });
        }
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => minijinja::Value::from(
                messages
                    .iter()
                    .map(|m| minijinja::Value::from_pairs([("role", m.role.as_str()), ("content", m.content.as_str())]))
                    .collect::<Vec<_>>(),
            ),
            add_generation_prompt => add_generation_prompt,
            bos_token => bos.unwrap_or(""),
            eos_token => eos.unwrap_or(""),
        })
        .map_err(|e| ModelError::Template(format!("{e:#}")))
    }
}

/// Turns client input into prompt token ids: the tokenizer plus the chat template (ChatML when
/// the model ships none). Cheap to clone and shareable across threads; nodes use it to serve
/// tokenization so the coordinator needs no model files.
#[derive(Clone)]
pub struct Prompter {
    tokenizer: std::sync::Arc<crate::tokenizer::Tokenizer>,
    template: std::sync::Arc<ChatTemplate>,
}

impl Prompter {
    pub fn new(tokenizer: std::sync::Arc<crate::tokenizer::Tokenizer>, template: Option<ChatTemplate>) -> Result<Self> {
        let template = match template {
            Some(t) => t,
            None => ChatTemplate::new(CHATML)?,
        };
        Ok(Self {
            tokenizer,
            template: std::sync::Arc::new(template),
        })
    }

    pub fn tokenizer(&self) -> &std::sync::Arc<crate::tokenizer::Tokenizer> {
        &self.tokenizer
    }

    /// Raw text: `add_special` adds the model's BOS, `parse_special` reads special-token text
    /// as those tokens.
    pub fn text(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, add_special, parse_special)
    }

    /// A conversation rendered with the assistant header appended (what `rrt generate --chat`
    /// feeds the model).
    pub fn chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.template.render(
            messages,
            true,
            self.tokenizer.bos_text.as_deref(),
            self.tokenizer.eos_text.as_deref(),
        )?;
        self.tokenizer.encode(&text, false, true)
    }
}

/// The ChatML template, used when a model ships none.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_like_python_jinja() {
        let t = ChatTemplate::new(CHATML).unwrap();
        let s = t.render(&[Message::new("user", "Hi")], true, None, None).unwrap();
        assert_eq!(s, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_errors() {
        let t = ChatTemplate::new("{{ raise_exception('only user roles') }}").unwrap();
        let e = t.render(&[Message::new("x", "y")], true, None, None).unwrap_err();
        assert!(e.to_string().contains("only user roles"), "{e}");
        assert!(ChatTemplate::new("{% for %}").is_err());
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new("{{ messages[0]['content'].strip().upper() }}").unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "  hi ")], false, None, None).unwrap(),
            "HI"
        );
    }
}
