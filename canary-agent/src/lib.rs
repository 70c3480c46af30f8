//! canary's node agent as a library. The `canary-agent` binary is a thin
//! shell around [`agent::run`]; the privileged tests drive [`dataplane`]
//! directly with the same code the agent uses.

pub mod agent;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod events;
pub mod http;
pub mod judge;
pub mod rollout;
pub mod slots;
pub mod status;
pub mod supervise;
pub mod sys;
pub mod telemetry;
pub mod units;
