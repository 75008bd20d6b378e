//! Datapath knowledge, kept as data in one place and shared by both modes: the hook table
//! ([`hooks`]), the rules that name the time between two hops after what the packet crosses
//! ([`segments`]), the description of an observed path after the devices it crossed
//! ([`path`]), and what dropped packets carried ([`protocols`]).

pub mod hooks;
pub mod path;
pub mod protocols;
pub mod segments;

pub use hooks::{decision_program, hook, label, HookDef, HopKey, Mode, Point, Via, HOOK_TABLE};
