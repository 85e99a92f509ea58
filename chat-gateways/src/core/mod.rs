//! The platform-neutral conversation core: types shared with the adapters, planners,
//! conversation state, confirmations, identity and the [`gateway::Core`] that ties them.

pub mod planner;
pub mod types;
