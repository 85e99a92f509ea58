//! The platform-neutral conversation core: types shared with the adapters, planners,
//! identity, state (confirmations, threads, alert subscriptions), fleet alerts and the [`gateway::Core`] that ties them.

pub mod alerts;
pub mod gateway;
pub mod identity;
pub mod planner;
pub mod seen;
pub mod state;
pub mod text;
pub mod tools;
pub mod types;
