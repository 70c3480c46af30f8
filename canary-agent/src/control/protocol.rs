//! The control protocol, shared by the agent and `canaryctl`: line-delimited
//! JSON, one request and one response per line, version 1.
//!
//! Request:  `{"v":1,"cmd":"set-weight","service":"web","weight":"5%"}`
//! Response: `{"v":1,"ok":true,"result":…}` or
//!           `{"v":1,"ok":false,"error":{"code":"…","message":"…"}}`
//!
//! The command names are the [`Request`] variants in kebab-case, written
//! nowhere else: `canaryctl` builds a `Request` and serde writes the name,
//! [`parse_request`] lets serde read it back, and the list of commands in
//! the `unknown-command` answer is serde's. Error codes are [`ErrorCode`]
//! the same way.

use std::fmt;

use serde::{Deserialize, Serialize, de::value::MapDeserializer};

use crate::units::Weight;

/// Protocol version of requests and responses.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest request line, in bytes.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Largest status response (many services): responses may be longer than
/// requests.
pub const MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// A command to the agent. On the wire the variant is the `cmd` field, in
/// kebab-case (`SetWeight` is `"set-weight"`), beside its arguments and the
/// version: see [`Request::to_line`] and [`parse_request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Every service, or one.
    Status {
        /// Only this service.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service: Option<String>,
    },
    /// Set the canary weight by hand.
    SetWeight {
        /// The service.
        service: String,
        /// The new weight, written `"5%"`, `"0.25%"` or `"2500ppm"`.
        weight: Weight,
    },
    /// Hold a plan-driven rollout.
    Pause {
        /// The service.
        service: String,
    },
    /// Back to the configured weight (clears a rollback, promotion or
    /// manual weight).
    Resume {
        /// The service.
        service: String,
    },
    /// Pass a manual gate of a plan.
    Approve {
        /// The service.
        service: String,
    },
    /// Everything to canary.
    Promote {
        /// The service.
        service: String,
    },
    /// Nothing new to canary.
    Rollback {
        /// The service.
        service: String,
    },
    /// Re-read the config file (as SIGHUP).
    Reload,
    /// The service's state changes: when, from, to, who and why.
    History {
        /// The service.
        service: String,
    },
    /// Why the service is where it is: its state, what the step waits
    /// for, the last verdicts.
    Explain {
        /// The service.
        service: String,
    },
}

/// A request with its version, as sent.
#[derive(Serialize)]
struct Versioned<'a> {
    v: u32,
    #[serde(flatten)]
    request: &'a Request,
}

impl Request {
    /// The request line as sent, without its newline:
    /// `{"v":1,"cmd":"set-weight","service":"web","weight":"5%"}`.
    pub fn to_line(&self) -> serde_json::Result<String> {
        serde_json::to_string(&Versioned {
            v: PROTOCOL_VERSION,
            request: self,
        })
    }

    /// The service the request names, if it names one.
    pub fn service(&self) -> Option<&str> {
        match self {
            Request::Status { service } => service.as_deref(),
            Request::SetWeight { service, .. }
            | Request::Pause { service }
            | Request::Resume { service }
            | Request::Approve { service }
            | Request::Promote { service }
            | Request::Rollback { service }
            | Request::History { service }
            | Request::Explain { service } => Some(service),
            Request::Reload => None,
        }
    }
}

/// Why a request was refused (or the agent failed), as a client scripts
/// against it. On the wire: the variant in kebab-case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// Not JSON, or not a request object.
    Malformed,
    /// Longer than [`MAX_MESSAGE`].
    TooLarge,
    /// A version this agent does not speak.
    UnsupportedVersion,
    /// No such command.
    UnknownCommand,
    /// A required argument is missing or invalid.
    BadArgument,
    /// The peer may not use the socket.
    Unauthorized,
    /// No service of that name.
    UnknownService,
    /// The command does not apply in the service's state or config.
    Conflict,
    /// The agent failed while doing it (see its log).
    Internal,
    /// Every connection slot is busy with a command; retry.
    Busy,
}

impl fmt::Display for ErrorCode {
    /// The wire name, taken from serde so that it is written in one place.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::String(name)) => f.write_str(&name),
            _ => Err(fmt::Error),
        }
    }
}

/// An error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What went wrong and what to do.
    pub message: String,
}

/// The answer to a request.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(try_from = "WireResponse<serde_json::Value, ErrorBody>")]
pub enum Response {
    /// The command succeeded; its result (`null` if it has none).
    Ok(serde_json::Value),
    /// The command was refused or failed.
    Error(ErrorBody),
}

impl Response {
    /// A success carrying `result`.
    pub fn ok(result: serde_json::Value) -> Response {
        Response::Ok(result)
    }

    /// A failure.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        Response::Error(ErrorBody {
            code,
            message: message.into(),
        })
    }

    /// The result, or the error, as a `Result`.
    pub fn into_result(self) -> Result<serde_json::Value, ErrorBody> {
        match self {
            Response::Ok(result) => Ok(result),
            Response::Error(error) => Err(error),
        }
    }
}

/// A response line's fields: the success flag decides which of `result`
/// and `error` is there.
#[derive(Serialize, Deserialize)]
struct WireResponse<R, E> {
    v: u32,
    ok: bool,
    // A missing key reads as None.
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<R>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<E>,
}

impl Serialize for Response {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let wire = match self {
            Response::Ok(result) => WireResponse {
                v: PROTOCOL_VERSION,
                ok: true,
                result: Some(result),
                error: None,
            },
            Response::Error(error) => WireResponse {
                v: PROTOCOL_VERSION,
                ok: false,
                result: None,
                error: Some(error),
            },
        };
        wire.serialize(s)
    }
}

/// An answer that says it failed but not why.
#[derive(Debug, thiserror::Error)]
#[error("the agent refused without saying why")]
pub struct NoErrorBody;

impl TryFrom<WireResponse<serde_json::Value, ErrorBody>> for Response {
    type Error = NoErrorBody;

    fn try_from(wire: WireResponse<serde_json::Value, ErrorBody>) -> Result<Self, NoErrorBody> {
        match (wire.ok, wire.result, wire.error) {
            (true, result, _) => Ok(Response::Ok(result.unwrap_or_default())),
            (false, _, Some(error)) => Ok(Response::Error(error)),
            (false, _, None) => Err(NoErrorBody),
        }
    }
}

/// A request line's outer shape, checked before its command is looked at:
/// exactly these keys, with these types; anything else is `malformed`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRequest {
    v: u32,
    cmd: String,
    service: Option<String>,
    weight: Option<String>,
}

/// What serde found wrong with a well-formed request's command or
/// arguments. Serde reports through this type's constructors, so each
/// problem maps to its error code without reading message text.
#[derive(Debug, thiserror::Error)]
enum Decode {
    /// `cmd` names no [`Request`] variant; `known` lists them.
    #[error("unknown command {name:?}")]
    UnknownCommand {
        name: String,
        known: &'static [&'static str],
    },
    /// An argument the command needs is not there.
    #[error("missing {0:?}")]
    Missing(&'static str),
    /// An argument did not parse (its message says which and why).
    #[error("{0}")]
    Invalid(String),
}

impl serde::de::Error for Decode {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Decode::Invalid(msg.to_string())
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        Decode::UnknownCommand {
            name: variant.to_string(),
            known: expected,
        }
    }

    fn missing_field(field: &'static str) -> Self {
        Decode::Missing(field)
    }
}

impl Decode {
    /// The answer to a request with command `cmd` that failed so.
    fn into_response(self, cmd: &str) -> Response {
        match self {
            Decode::UnknownCommand { name, known } => Response::error(
                ErrorCode::UnknownCommand,
                format!("unknown command {name:?}; one of {}", known.join(", ")),
            ),
            Decode::Missing(field) => {
                Response::error(ErrorCode::BadArgument, format!("{cmd} needs a {field:?}"))
            }
            Decode::Invalid(message) => Response::error(ErrorCode::BadArgument, message),
        }
    }
}

/// Decodes one request line, or the error to answer: `malformed` (not a
/// request object, unknown keys, wrong types), `unsupported-version`,
/// `unknown-command` or `bad-argument`, checked in that order.
pub fn parse_request(line: &str) -> Result<Request, Response> {
    let wire: WireRequest = serde_json::from_str(line).map_err(|e| {
        Response::error(
            ErrorCode::Malformed,
            format!(
                "not a request: {e}; send one JSON object per line, e.g. {{\"v\":1,\"cmd\":\"status\"}}"
            ),
        )
    })?;
    if wire.v != PROTOCOL_VERSION {
        return Err(Response::error(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {} is not supported; this agent speaks {PROTOCOL_VERSION}",
                wire.v
            ),
        ));
    }
    // The command and its arguments go through Request's own serde: the
    // names are read where they are defined.
    let fields = [
        ("cmd", Some(wire.cmd.as_str())),
        ("service", wire.service.as_deref()),
        ("weight", wire.weight.as_deref()),
    ]
    .into_iter()
    .filter_map(|(key, value)| value.map(|v| (key, v)));
    let request = Request::deserialize(MapDeserializer::<_, Decode>::new(fields))
        .map_err(|e| e.into_response(&wire.cmd))?;
    // `status` with an empty service asks for a service of that name (and
    // gets unknown-service); every other command needs a real one.
    if !matches!(request, Request::Status { .. }) && request.service() == Some("") {
        return Err(Decode::Missing("service").into_response(&wire.cmd));
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_requests() -> Vec<Request> {
        let service = || "web".to_string();
        vec![
            Request::Status { service: None },
            Request::Status {
                service: Some(service()),
            },
            Request::SetWeight {
                service: service(),
                weight: "0.25%".parse().unwrap(),
            },
            Request::Pause { service: service() },
            Request::Resume { service: service() },
            Request::Approve { service: service() },
            Request::Promote { service: service() },
            Request::Rollback { service: service() },
            Request::Reload,
        ]
    }

    #[test]
    fn requests_are_written_as_version_one_lines() {
        let lines: Vec<String> = all_requests()
            .iter()
            .map(|r| r.to_line().unwrap())
            .collect();
        assert_eq!(
            lines,
            [
                r#"{"v":1,"cmd":"status"}"#,
                r#"{"v":1,"cmd":"status","service":"web"}"#,
                r#"{"v":1,"cmd":"set-weight","service":"web","weight":"0.25%"}"#,
                r#"{"v":1,"cmd":"pause","service":"web"}"#,
                r#"{"v":1,"cmd":"resume","service":"web"}"#,
                r#"{"v":1,"cmd":"approve","service":"web"}"#,
                r#"{"v":1,"cmd":"promote","service":"web"}"#,
                r#"{"v":1,"cmd":"rollback","service":"web"}"#,
                r#"{"v":1,"cmd":"reload"}"#,
            ]
        );
    }

    #[test]
    fn every_request_canaryctl_writes_parses_back_to_itself() {
        for request in all_requests() {
            let line = request.to_line().unwrap();
            assert_eq!(parse_request(&line), Ok(request), "{line}");
        }
    }

    #[test]
    fn requests_parse_into_commands() {
        assert_eq!(
            parse_request(r#"{"v":1,"cmd":"set-weight","service":"web","weight":"2500ppm"}"#),
            Ok(Request::SetWeight {
                service: "web".into(),
                weight: "0.25%".parse().unwrap()
            })
        );
        // Keys in any order; arguments a command does not take are ignored.
        assert_eq!(
            parse_request(r#"{"service":"web","cmd":"rollback","v":1}"#),
            Ok(Request::Rollback {
                service: "web".into()
            })
        );
        assert_eq!(
            parse_request(r#"{"v":1,"cmd":"reload","service":"web","weight":"5%"}"#),
            Ok(Request::Reload)
        );
        assert_eq!(
            parse_request(r#"{"v":1,"cmd":"status","service":""}"#),
            Ok(Request::Status {
                service: Some(String::new())
            })
        );
    }

    #[test]
    fn bad_requests_get_structured_errors() {
        let err = |line: &str| match parse_request(line) {
            Err(Response::Error(e)) => e,
            other => panic!("expected an error answer for {line}, got {other:?}"),
        };
        assert_eq!(err("not json").code, ErrorCode::Malformed);
        assert_eq!(err("[1]").code, ErrorCode::Malformed);
        assert_eq!(
            err(r#"{"v":2,"cmd":"status"}"#).code,
            ErrorCode::UnsupportedVersion
        );
        assert_eq!(
            err(r#"{"v":2,"cmd":"explode"}"#).code,
            ErrorCode::UnsupportedVersion,
            "the version is checked first"
        );
        let e = err(r#"{"v":1,"cmd":"explode"}"#);
        assert_eq!(e.code, ErrorCode::UnknownCommand);
        assert_eq!(
            e.message,
            "unknown command \"explode\"; one of status, set-weight, pause, resume, approve, \
             promote, rollback, reload, history, explain"
        );
        assert_eq!(
            err(r#"{"v":1,"cmd":"status","extra":1}"#).code,
            ErrorCode::Malformed
        );
        assert_eq!(
            err(r#"{"v":1,"cmd":"status","service":5}"#).code,
            ErrorCode::Malformed
        );
        assert_eq!(
            err(r#"{"v":1,"cmd":"status","v":1}"#).code,
            ErrorCode::Malformed
        );
        let e = err(r#"{"v":1,"cmd":"promote"}"#);
        assert_eq!(
            (e.code, e.message.as_str()),
            (ErrorCode::BadArgument, "promote needs a \"service\"")
        );
        let e = err(r#"{"v":1,"cmd":"pause","service":""}"#);
        assert_eq!(
            (e.code, e.message.as_str()),
            (ErrorCode::BadArgument, "pause needs a \"service\"")
        );
        let e = err(r#"{"v":1,"cmd":"set-weight","service":"web"}"#);
        assert_eq!(
            (e.code, e.message.as_str()),
            (ErrorCode::BadArgument, "set-weight needs a \"weight\"")
        );
        let e = err(r#"{"v":1,"cmd":"set-weight","service":"web","weight":"150%"}"#);
        assert_eq!(e.code, ErrorCode::BadArgument);
        assert!(
            e.message.starts_with("weight \"150%\": more than 100%"),
            "{}",
            e.message
        );
    }

    #[test]
    fn responses_keep_the_version_one_shape() {
        let ok = Response::ok(serde_json::json!({ "reloaded": true }));
        let text = serde_json::to_string(&ok).unwrap();
        assert_eq!(text, r#"{"v":1,"ok":true,"result":{"reloaded":true}}"#);
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), ok);

        let err = Response::error(ErrorCode::UnsupportedVersion, "speak 1");
        let text = serde_json::to_string(&err).unwrap();
        assert_eq!(
            text,
            r#"{"v":1,"ok":false,"error":{"code":"unsupported-version","message":"speak 1"}}"#
        );
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), err);

        assert_eq!(
            serde_json::from_str::<Response>(r#"{"v":1,"ok":true}"#).unwrap(),
            Response::Ok(serde_json::Value::Null)
        );
        let refused = serde_json::from_str::<Response>(r#"{"v":1,"ok":false}"#).unwrap_err();
        assert!(
            refused.to_string().contains("without saying why"),
            "{refused}"
        );
    }

    #[test]
    fn error_codes_display_their_wire_names() {
        let codes = [
            (ErrorCode::Malformed, "malformed"),
            (ErrorCode::TooLarge, "too-large"),
            (ErrorCode::UnsupportedVersion, "unsupported-version"),
            (ErrorCode::UnknownCommand, "unknown-command"),
            (ErrorCode::BadArgument, "bad-argument"),
            (ErrorCode::Unauthorized, "unauthorized"),
            (ErrorCode::UnknownService, "unknown-service"),
            (ErrorCode::Conflict, "conflict"),
            (ErrorCode::Internal, "internal"),
            (ErrorCode::Busy, "busy"),
        ];
        for (code, name) in codes {
            assert_eq!(code.to_string(), name);
            assert_eq!(serde_json::to_string(&code).unwrap(), format!("\"{name}\""));
        }
    }
}
