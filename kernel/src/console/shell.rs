//! The console's command table and dispatcher: one line in, one command run, one clear error
//! (with the command's usage) when the line is wrong. Commands write through `fmt::Write`, so
//! this whole path runs in host tests.

use alloc::string::String;
use core::fmt::{self, Write};

/// One console command.
pub struct Command<Ctx> {
    pub name: &'static str,
    /// Arguments, as `help` prints them after the name (e.g. `level <off|error|...>`).
    pub usage: &'static str,
    pub summary: &'static str,
    /// Debug helpers that `help` does not list.
    pub hidden: bool,
    pub run: fn(&mut Ctx, &[&str], &mut dyn Write) -> Result<(), CommandError>,
}

/// How a command can fail.
#[derive(Debug, PartialEq, Eq)]
pub enum CommandError {
    /// The arguments were wrong: the text says what was wrong; the usage follows it.
    BadArguments(String),
    /// The arguments were fine but the action failed.
    Failed(String),
}

/// What went wrong with a line, as the shell reports it.
#[derive(Debug, PartialEq, Eq)]
pub enum DispatchError {
    UnknownCommand {
        name: String,
        /// The visible command names, for the usage line.
        known: String,
    },
    BadArguments {
        command: &'static str,
        usage: &'static str,
        reason: String,
    },
    Failed {
        command: &'static str,
        reason: String,
    },
}

impl fmt::Display for DispatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DispatchError::UnknownCommand { name, known } => write!(
                f,
                "error: unknown command '{name}'\nusage: <command> [arguments], one of: {known} \
                 ('help' explains each)"
            ),
            DispatchError::BadArguments {
                command,
                usage,
                reason,
            } => write!(f, "error: {command}: {reason}\nusage: {command} {usage}"),
            DispatchError::Failed { command, reason } => write!(f, "error: {command}: {reason}"),
        }
    }
}

/// Most arguments a line may have; more is a bad-arguments error, not an allocation.
pub const MAX_ARGS: usize = 16;

/// Splits `line` into words and runs the matching command. An empty line is `Ok`.
pub fn dispatch<Ctx>(
    table: &[Command<Ctx>],
    ctx: &mut Ctx,
    line: &str,
    out: &mut dyn Write,
) -> Result<(), DispatchError> {
    let mut words = line.split_whitespace();
    let Some(name) = words.next() else {
        return Ok(());
    };
    let Some(command) = table.iter().find(|c| c.name == name) else {
        let mut shown = String::new();
        // Keep the echo of a garbage line readable and bounded.
        for c in name.chars().take(32) {
            shown.push(c);
        }
        if name.chars().count() > 32 {
            shown.push_str("...");
        }
        let mut known = String::new();
        for c in table.iter().filter(|c| !c.hidden) {
            if !known.is_empty() {
                known.push_str(", ");
            }
            known.push_str(c.name);
        }
        return Err(DispatchError::UnknownCommand { name: shown, known });
    };
    let mut args = [""; MAX_ARGS];
    let mut count = 0;
    for word in words {
        if count == MAX_ARGS {
            return Err(DispatchError::BadArguments {
                command: command.name,
                usage: command.usage,
                reason: alloc::format!("too many arguments (at most {MAX_ARGS})"),
            });
        }
        args[count] = word;
        count += 1;
    }
    (command.run)(ctx, &args[..count], out).map_err(|err| match err {
        CommandError::BadArguments(reason) => DispatchError::BadArguments {
            command: command.name,
            usage: command.usage,
            reason,
        },
        CommandError::Failed(reason) => DispatchError::Failed {
            command: command.name,
            reason,
        },
    })
}

/// Writes the `help` listing: every visible command with its usage and summary, aligned.
pub fn write_help<Ctx>(table: &[Command<Ctx>], out: &mut dyn Write) -> fmt::Result {
    let visible = || table.iter().filter(|c| !c.hidden);
    let width = visible()
        .map(|c| c.name.len() + 1 + c.usage.len())
        .max()
        .unwrap_or(0);
    for c in visible() {
        let mut left = String::from(c.name);
        if !c.usage.is_empty() {
            left.push(' ');
            left.push_str(c.usage);
        }
        writeln!(out, "  {left:<width$}  {}", c.summary)?;
    }
    Ok(())
}

/// Parses a numeric argument, naming it in the error.
pub fn parse_number(what: &str, text: &str) -> Result<u64, CommandError> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| {
        CommandError::BadArguments(alloc::format!("{what} must be a number, not '{text}'"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec::Vec;

    #[derive(Default)]
    struct Ctx {
        calls: Vec<Vec<String>>,
    }

    fn echo(ctx: &mut Ctx, args: &[&str], out: &mut dyn Write) -> Result<(), CommandError> {
        ctx.calls.push(args.iter().map(|a| a.to_string()).collect());
        write!(out, "{}", args.join(" ")).map_err(|_| CommandError::Failed("write".into()))
    }

    fn strict(_: &mut Ctx, args: &[&str], _: &mut dyn Write) -> Result<(), CommandError> {
        match args {
            ["on" | "off"] => Ok(()),
            _ => Err(CommandError::BadArguments("expected on or off".into())),
        }
    }

    fn broken(_: &mut Ctx, _: &[&str], _: &mut dyn Write) -> Result<(), CommandError> {
        Err(CommandError::Failed("device gone".into()))
    }

    const TABLE: &[Command<Ctx>] = &[
        Command {
            name: "echo",
            usage: "<words...>",
            summary: "prints its words",
            hidden: false,
            run: echo,
        },
        Command {
            name: "switch",
            usage: "<on|off>",
            summary: "flips a switch",
            hidden: false,
            run: strict,
        },
        Command {
            name: "secret",
            usage: "",
            summary: "not listed",
            hidden: true,
            run: broken,
        },
    ];

    fn run(line: &str) -> (Ctx, String, Result<(), DispatchError>) {
        let mut ctx = Ctx::default();
        let mut out = String::new();
        let result = dispatch(TABLE, &mut ctx, line, &mut out);
        (ctx, out, result)
    }

    #[test]
    fn runs_the_named_command_with_its_words() {
        let (ctx, out, result) = run("  echo  a   b ");
        assert_eq!(result, Ok(()));
        assert_eq!(out, "a b");
        assert_eq!(ctx.calls, [["a", "b"]]);
    }

    #[test]
    fn blank_lines_do_nothing() {
        for line in ["", "   ", "\t"] {
            let (ctx, _, result) = run(line);
            assert_eq!(result, Ok(()));
            assert!(ctx.calls.is_empty());
        }
    }

    #[test]
    fn unknown_commands_are_named_in_the_error() {
        let (_, _, result) = run("frobnicate now");
        let err = result.unwrap_err();
        assert_eq!(
            err,
            DispatchError::UnknownCommand {
                name: "frobnicate".into(),
                known: "echo, switch".into()
            }
        );
        let text = err.to_string();
        assert!(text.contains("unknown command 'frobnicate'"), "{text}");
        assert!(
            text.contains("usage: <command> [arguments], one of: echo, switch"),
            "{text}"
        );
    }

    #[test]
    fn a_huge_unknown_word_is_shortened_in_the_error() {
        let line = "x".repeat(10_000);
        let (_, _, result) = run(&line);
        let text = result.unwrap_err().to_string();
        assert!(text.lines().next().unwrap().len() < 100, "{text}");
        assert!(text.contains("..."));
    }

    #[test]
    fn bad_arguments_come_with_the_usage() {
        let (_, _, result) = run("switch sideways");
        let text = result.unwrap_err().to_string();
        assert!(text.contains("error: switch: expected on or off"), "{text}");
        assert!(text.contains("usage: switch <on|off>"), "{text}");
    }

    #[test]
    fn too_many_arguments_are_refused_without_running() {
        let line = alloc::format!("echo {}", "w ".repeat(MAX_ARGS + 1));
        let (ctx, _, result) = run(&line);
        assert!(matches!(result, Err(DispatchError::BadArguments { .. })));
        assert!(ctx.calls.is_empty());
        let line = alloc::format!("echo {}", "w ".repeat(MAX_ARGS));
        assert_eq!(run(&line).2, Ok(()));
    }

    #[test]
    fn failures_name_the_command() {
        let (_, _, result) = run("secret");
        assert_eq!(
            result.unwrap_err().to_string(),
            "error: secret: device gone"
        );
    }

    #[test]
    fn help_lists_visible_commands_aligned() {
        let mut out = String::new();
        write_help(TABLE, &mut out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("  echo <words...>  "));
        assert!(lines[1].starts_with("  switch <on|off>  "));
        assert!(!out.contains("secret"));
        let column = |l: &str| l.find("prints").or_else(|| l.find("flips")).unwrap();
        assert_eq!(column(lines[0]), column(lines[1]));
    }

    #[test]
    fn numbers_parse_in_decimal_and_hex() {
        assert_eq!(parse_number("count", "42"), Ok(42));
        assert_eq!(parse_number("count", "0x2a"), Ok(42));
        assert!(
            matches!(parse_number("count", "many"), Err(CommandError::BadArguments(m)) if m.contains("count must be a number"))
        );
        assert!(parse_number("count", "-1").is_err());
    }
}
