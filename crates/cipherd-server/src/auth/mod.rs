//! Identity and authorization: who is calling (bearer tokens, JWTs, mTLS
//! certificates), and what their policies allow.

pub mod glob;
pub mod jwt;
pub mod policy;
pub mod rate;
pub mod state;
