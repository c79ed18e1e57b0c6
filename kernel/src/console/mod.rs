pub mod line;
pub mod shell;
