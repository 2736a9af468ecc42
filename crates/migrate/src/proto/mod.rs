//! Protocol version 2 (docs/PROTOCOL.md): frames and their payloads.

pub mod frame;
pub mod msg;
