//! Error kinds that change the exit code.
//!
//! Everything else is an `anyhow::Error` with context; a chain that contains an [`InputError`]
//! means the user's input (a spec, a flag, the environment, an API answer) was wrong: exit code 2.

use std::fmt;

/// Bad input from the user: the process exits with code 2 and prints the message.
#[derive(Debug)]
pub struct InputError(pub String);

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InputError {}

/// Builds an `anyhow::Error` that carries an [`InputError`].
pub fn input(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(InputError(msg.into()))
}

/// The exit code for an error chain: 2 when any cause is an [`InputError`], else 1.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if err
        .chain()
        .any(|c| c.downcast_ref::<InputError>().is_some())
    {
        2
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn input_errors_exit_2_even_under_context() {
        let e: anyhow::Result<()> = Err(input("bad key"));
        let e = e.context("reading spec").unwrap_err();
        assert_eq!(exit_code(&e), 2);
        assert_eq!(exit_code(&anyhow::anyhow!("io")), 1);
    }
}
