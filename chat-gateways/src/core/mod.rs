//! The platform-neutral conversation core: types shared with the adapters, planners,
//! identity, state (confirmations, threads) and the [`gateway::Core`] that ties them.

pub mod gateway;
pub mod identity;
pub mod planner;
pub mod state;
pub mod tools;
pub mod types;
