//! An rmcp client handler shared by the MCP tests of the server and of `flotilla mcp` (stdio).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rmcp::model::{
    ClientCapabilities, ClientConfig, ElicitRequestParams, ElicitResult, ElicitationAction,
    ElicitationCapability, FormElicitationCapability, Implementation,
};
use rmcp::service::RequestContext;
use rmcp::{ClientHandler, ErrorData as McpError, RoleClient};
use serde_json::json;

/// An MCP client; with `elicit`, it declares form elicitation and answers every request
/// with that choice (counting them in `asked`).
#[derive(Clone, Default)]
pub struct ElicitingClient {
    pub elicit: Option<bool>,
    pub asked: Arc<AtomicUsize>,
}

impl ClientHandler for ElicitingClient {
    fn get_info(&self) -> ClientConfig {
        let mut caps = ClientCapabilities::default();
        if self.elicit.is_some() {
            caps.elicitation =
                Some(ElicitationCapability::default().with_form(FormElicitationCapability::new()));
        }
        ClientConfig::new(caps, Implementation::new("flotilla-tests", "0"))
    }

    async fn create_elicitation(
        &self,
        request: ElicitRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, McpError> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        let ElicitRequestParams::FormElicitationParams { message, .. } = request else {
            return Ok(ElicitResult::new(ElicitationAction::Decline));
        };
        assert!(message.contains("restart"), "{message}");
        Ok(match self.elicit {
            Some(true) => {
                ElicitResult::new(ElicitationAction::Accept).with_content(json!({"confirm": true}))
            }
            _ => ElicitResult::new(ElicitationAction::Decline),
        })
    }
}
