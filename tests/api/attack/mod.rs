//! The attack suite: hostile tokens, `Authorization` headers, path user ids and bodies, slow
//! clients, a burst of distinct targets, and the logs of it all. Every answer must be a 4xx (or
//! the connection closed by the HTTP layer), never a 5xx or a panic, the server must keep
//! serving, and nothing of an attack may be stored, consumed or written to the logs.

mod bodies;
mod burst;
mod headers;
mod logs;
mod paths;
mod slow;
mod tokens;
