//! What more than one benchmark uses: the MCP server they load, and what a process spent.

#![allow(dead_code)] // Each benchmark uses a different part of this module.

pub mod echo;
pub mod usage;
