//! The control socket that `canaryctl` talks to: [`protocol`] (the typed
//! requests and responses both sides share, and the decoder) and
//! [`server`] (binding, authorisation, serving within limits).

pub mod protocol;
pub mod server;

pub use protocol::{
    ErrorBody, ErrorCode, MAX_MESSAGE, MAX_RESPONSE, PROTOCOL_VERSION, Request, Response,
    parse_request,
};
pub use server::{
    Access, Call, ControlError, ControlServer, IDLE, MAX_CONNECTIONS, WRITE_TIMEOUT, bind,
};
