//! What several nodes share when one journey crosses them: their clocks, reconciled from the
//! packets that cross between them.

pub mod clock;
