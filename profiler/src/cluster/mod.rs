//! What several nodes share when one journey crosses them: their clocks, reconciled from the
//! packets that cross between them, and the agents' channel, under the cluster's own TLS.

pub mod channel;
pub mod clock;
pub mod join;
pub mod tls;
