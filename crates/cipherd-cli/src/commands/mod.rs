//! Running parsed commands against cipherd: connect, read input, call the client,
//! hand the result to `output`.
//!
//! One submodule per area: `system` (lifecycle), `keys` (key management), `transit`
//! (one value at a time), `lines` (`--lines` streaming batches), `auth` (tokens and
//! roles), `policy` (policies), `audit` (offline log verification, audit
//! hashes). Helpers shared by them (credentials, stdin,
//! ciphertext input and output forms) live here. Rendering decisions belong to
//! `output`, syntax to `cli`.
//!
//! The bearer token (`--token`, `CIPHERD_TOKEN` or `--token-file`) goes to the
//! client library and nowhere else: no message here ever contains it.

mod audit;
mod auth;
mod backup;
mod keys;
mod lines;
mod policy;
mod system;
mod transit;

use std::{
    io::{IsTerminal as _, Write as _},
    path::Path,
    time::Duration,
};

use anyhow::Context as _;
use base64::Engine as _;
use cipherd_client::{Client, ClientOptions, Purpose, TlsOptions, Token};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _};
use zeroize::Zeroizing;

use crate::{
    cli::{AuditCommand, Cli, Command, GlobalArgs, PurposeArgs},
    error::Failure,
    output::{self, ErasedView, Format},
};

/// Runs one command to completion; any failure (including failed `--lines` items)
/// comes back as `Err` and makes the process exit 1.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let format = if cli.global.json {
        Format::Json
    } else {
        Format::Human
    };
    // Offline: no connection.
    let command = match cli.command {
        Command::Audit(AuditCommand::Verify(args)) => return audit::verify(format, &args),
        other => other,
    };
    let ctx = Ctx {
        client: connect(&cli.global, matches!(command, Command::Restore(_))).await?,
        format,
    };
    match command {
        Command::Status => system::status(&ctx).await?,
        Command::Init(args) => system::init(&ctx, args).await?,
        Command::Unseal(args) => system::unseal(&ctx, args).await?,
        Command::Seal => system::seal(&ctx).await?,
        Command::Rekey(command) => system::rekey(&ctx, command).await?,
        Command::RotateRoot(command) => system::rotate_root(&ctx, command).await?,
        Command::Backup(args) => backup::backup(&ctx, args).await?,
        Command::Restore(args) => backup::restore(&ctx, args).await?,
        Command::Key(cmd) => keys::run(&ctx, cmd).await?,
        Command::Encrypt(args) if args.lines => lines::encrypt(&ctx, args).await?,
        Command::Encrypt(args) => transit::encrypt(&ctx, args).await?,
        Command::Decrypt(args) if args.lines => lines::decrypt(&ctx, args).await?,
        Command::Decrypt(args) => transit::decrypt(&ctx, args).await?,
        Command::Rewrap(args) if args.lines => lines::rewrap(&ctx, args).await?,
        Command::Rewrap(args) => transit::rewrap(&ctx, args).await?,
        Command::Datakey(args) => transit::datakey(&ctx, args).await?,
        Command::Token(cmd) => auth::token(&ctx, cmd).await?,
        Command::Role(cmd) => auth::role(&ctx, cmd).await?,
        Command::Policy(cmd) => policy::run(&ctx, cmd).await?,
        Command::Audit(cmd) => audit::run(&ctx, cmd).await?,
    }
    Ok(())
}

/// What every command needs: the connection and the output format.
struct Ctx {
    client: Client,
    format: Format,
}

impl Ctx {
    /// Prints one command result on stdout.
    fn emit(&self, view: &dyn ErasedView) -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        output::emit(self.format, view, &mut out).context("writing to stdout")?;
        out.flush().context("writing to stdout")?;
        Ok(())
    }
}

/// How long `restore` may take without `--timeout`: its one reply follows the
/// whole upload and import, which the usual per-call default would cut short.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Connects with the global flags applied; `long_call` (restore) raises the
/// per-call default to [`RESTORE_TIMEOUT`] unless `--timeout` is given.
async fn connect(global: &GlobalArgs, long_call: bool) -> anyhow::Result<Client> {
    let addr = endpoint(&global.addr, global.ca_cert.is_some());
    let mut options = ClientOptions {
        token: token(global)?,
        tls: tls_options(global, &addr)?,
        ..ClientOptions::default()
    };
    if long_call {
        options.timeout = RESTORE_TIMEOUT;
    }
    if let Some(timeout) = global.timeout {
        options.timeout = timeout;
        options.connect_timeout = timeout;
    }
    Client::connect_with(addr.clone(), options)
        .await
        .map_err(|e| {
            let mut f = Failure::from_client(&e);
            if matches!(e, cipherd_client::Error::Credentials(_)) {
                // Refused before connecting: nothing about the address to say.
                f.message = format!(
                    "{}; check --token, CIPHERD_TOKEN or --token-file",
                    f.message
                );
                return f;
            }
            // The only protocol error before any call is an unparsable endpoint.
            if matches!(e, cipherd_client::Error::Protocol(_)) {
                f.reason = "INVALID_ADDRESS".to_owned();
            }
            Failure {
                message: format!("cannot connect to cipherd at {addr}: {}", f.message),
                ..f
            }
        })
        .map_err(anyhow::Error::from)
}

/// The bearer token: from `--token-file`, else `--token` / `CIPHERD_TOKEN` (an
/// empty value, such as an exported but empty variable, means none).
fn token(global: &GlobalArgs) -> Result<Option<Token>, Failure> {
    if let Some(path) = &global.token_file {
        return read_token_file(path).map(Some);
    }
    Ok(global
        .token
        .as_ref()
        .map(|t| t.expose())
        .filter(|t| !t.is_empty())
        .map(Token::from))
}

/// The one line of `path` that is neither blank nor a `#` comment. Warns (on
/// stderr) when others may read the file. Errors name the file, never its content.
fn read_token_file(path: &Path) -> Result<Token, Failure> {
    let shown = path.display();
    let text = std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|e| Failure::new("IO", format!("reading the token file {shown}: {e}")))?;
    let text = std::str::from_utf8(&text).map_err(|_| {
        Failure::new(
            "INVALID_TOKEN",
            format!("the token file {shown} is not UTF-8"),
        )
    })?;
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let token = match (lines.next(), lines.next()) {
        (Some(token), None) => Token::from(token),
        (None, _) => {
            return Err(Failure::new(
                "INVALID_TOKEN",
                format!("the token file {shown} holds no token"),
            ));
        }
        (Some(_), Some(_)) => {
            return Err(Failure::new(
                "INVALID_TOKEN",
                format!(
                    "the token file {shown} holds more than one line besides `#` comments; \
                     put only the token in it"
                ),
            ));
        }
    };
    warn_if_shared(path);
    Ok(token)
}

#[cfg(unix)]
fn warn_if_shared(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        eprintln!(
            "warning: the token file {} may be read by other users (mode {:o}); \
             `chmod 600` it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
}

#[cfg(not(unix))]
fn warn_if_shared(_: &Path) {}

/// The purpose of use the flags give, if any.
fn purpose(args: &PurposeArgs) -> Option<Purpose> {
    args.purpose
        .as_ref()
        .map(|p| Purpose::new(p.clone()).with_reason(args.reason.clone().unwrap_or_default()))
}

/// TLS from `--ca-cert`, `--client-cert`/`--client-key` and `--tls-server-name`
/// for the endpoint `addr` (`https://` needs `--ca-cert`; `http://` refuses it).
fn tls_options(global: &GlobalArgs, addr: &str) -> anyhow::Result<Option<TlsOptions>> {
    let read = |flag: &str, path: &Path| {
        std::fs::read(path).with_context(|| format!("reading {flag} {}", path.display()))
    };
    let https = addr.starts_with("https://");
    let Some(ca) = &global.ca_cert else {
        if https {
            return Err(Failure::new(
                "INVALID_ADDRESS",
                format!(
                    "{addr}: TLS needs --ca-cert FILE (or CIPHERD_CACERT), the CA that signed \
                     cipherd's certificate"
                ),
            )
            .into());
        }
        return Ok(None);
    };
    if !https {
        return Err(Failure::new(
            "INVALID_ADDRESS",
            format!("{addr}: --ca-cert turns TLS on; use an https:// address"),
        )
        .into());
    }
    let mut tls = TlsOptions::new(read("--ca-cert", ca)?);
    if let (Some(cert), Some(key)) = (&global.client_cert, &global.client_key) {
        tls = tls.with_identity(read("--client-cert", cert)?, read("--client-key", key)?);
    }
    if let Some(name) = &global.tls_server_name {
        tls = tls.with_domain(name.clone());
    }
    Ok(Some(tls))
}

/// `host:port` means `http://host:port` (`https://` with `tls`); a scheme given
/// is kept. Without a port the address means cipherd's port, [`DEFAULT_PORT`],
/// never the scheme's (80), where no cipherd listens.
fn endpoint(addr: &str, tls: bool) -> String {
    let default_scheme = if tls { "https" } else { "http" };
    let (scheme, rest) = addr.split_once("://").unwrap_or((default_scheme, addr));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    // An IPv6 literal's colons are inside its brackets.
    let port_part = authority.rfind(']').map_or(authority, |i| &authority[i..]);
    let mut out = format!("{scheme}://{authority}");
    if !port_part.contains(':') && !authority.is_empty() {
        out.push_str(&format!(":{DEFAULT_PORT}"));
    }
    if !path.is_empty() {
        out.push('/');
        out.push_str(path);
    }
    out
}

/// cipherd's default gRPC port, as in the server's default `listen`.
const DEFAULT_PORT: u16 = 8210;

/// All of stdin, as raw bytes.
async fn read_stdin_all(what: &str) -> anyhow::Result<Vec<u8>> {
    if std::io::stdin().is_terminal() {
        eprintln!("reading the {what} from stdin; end with Ctrl-D");
    }
    let mut buf = Vec::new();
    tokio::io::stdin()
        .read_to_end(&mut buf)
        .await
        .with_context(|| format!("reading the {what} from stdin"))?;
    Ok(buf)
}

/// One line of stdin without its line ending, prompting on a terminal.
async fn read_stdin_line(prompt: &str) -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        eprint!("{prompt}: ");
        std::io::stderr().flush().ok();
    }
    let mut line = String::new();
    tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await
        .context("reading stdin")?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

/// Decodes `--base64` input (surrounding whitespace, like a final newline, ignored).
fn decode_base64_input(input: &[u8]) -> Result<Vec<u8>, Failure> {
    base64::engine::general_purpose::STANDARD
        .decode(input.trim_ascii())
        .map_err(|e| {
            Failure::new(
                "INVALID_INPUT",
                format!("the input is not valid base64: {e}"),
            )
        })
}

/// A ciphertext as typed or piped: the text form is passed through; anything else
/// is taken as base64 of the binary form. Surrounding whitespace is dropped (the
/// format itself never contains any). Input that is neither is sent as is, so the
/// server answers with its one opaque `DECRYPTION_FAILED`.
fn ciphertext_input(input: &[u8]) -> Vec<u8> {
    let input = input.trim_ascii();
    if input.starts_with(b"cipherd:") {
        return input.to_vec();
    }
    base64::engine::general_purpose::STANDARD
        .decode(input)
        .unwrap_or_else(|_| input.to_vec())
}

/// A returned ciphertext in printable form: the server's text form as is, or base64
/// of the binary form (`--binary`).
fn ciphertext_output(ciphertext: &[u8], binary: bool) -> Result<String, Failure> {
    if binary {
        return Ok(output::b64(ciphertext));
    }
    String::from_utf8(ciphertext.to_vec()).map_err(|_| {
        Failure::new(
            "PROTOCOL",
            "the server returned a text-form ciphertext that is not UTF-8",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_get_a_scheme_and_cipherds_port_when_missing() {
        assert_eq!(endpoint("127.0.0.1:8210", false), "http://127.0.0.1:8210");
        assert_eq!(endpoint("https://kms:8210", false), "https://kms:8210");
        assert_eq!(endpoint("127.0.0.1", false), "http://127.0.0.1:8210");
        assert_eq!(endpoint("http://kms", false), "http://kms:8210");
        assert_eq!(endpoint("https://kms/", false), "https://kms:8210");
        assert_eq!(endpoint("[::1]", false), "http://[::1]:8210");
        assert_eq!(endpoint("[::1]:9", false), "http://[::1]:9");
        assert_eq!(endpoint("kms:1/base", false), "http://kms:1/base");
        // With --ca-cert, no scheme means https; a given scheme is kept.
        assert_eq!(endpoint("kms", true), "https://kms:8210");
        assert_eq!(endpoint("http://kms", true), "http://kms:8210");
    }

    fn token_file(content: &str) -> (tempfile::NamedTempFile, Result<Token, Failure>) {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(content.as_bytes()).expect("write");
        let token = read_token_file(file.path());
        (file, token)
    }

    #[test]
    fn token_files_hold_one_line_besides_comments() {
        for content in [
            "s.abc\n",
            "s.abc",
            "  s.abc  \r\n",
            "# INSECURE: dev-mode root token\n# a comment s.zzz\n\ns.abc\n",
        ] {
            let (_file, token) = token_file(content);
            assert_eq!(
                token.expect(content).expose_secret(),
                "s.abc",
                "{content:?}"
            );
        }
        for content in ["", "# only a comment\n", "s.one\ns.two\n"] {
            let (_file, token) = token_file(content);
            let err = token.expect_err(content);
            assert_eq!(err.reason, "INVALID_TOKEN", "{content:?}");
            assert!(!err.message.contains("s.one"), "{}", err.message);
        }
        let err = read_token_file(Path::new("/nonexistent/token")).expect_err("missing");
        assert_eq!(err.reason, "IO");
        assert!(
            err.message.contains("/nonexistent/token"),
            "{}",
            err.message
        );
    }

    fn global(args: &[&str]) -> GlobalArgs {
        use clap::Parser as _;
        Cli::try_parse_from(["cipherctl"].iter().chain(args).chain(&["status"]))
            .expect("parses")
            .global
    }

    #[test]
    fn the_token_file_is_read_and_an_empty_token_means_none() {
        let (file, _) = token_file("s.fromfile\n");
        let path = file.path().to_str().expect("utf-8 path");
        let from_file = token(&global(&["--token-file", path])).expect("read");
        assert_eq!(from_file.expect("some").expose_secret(), "s.fromfile");
        let both = token(&global(&["--token", "s.flag", "--token-file", path])).expect("read");
        assert_eq!(
            both.expect("some").expose_secret(),
            "s.fromfile",
            "the file wins"
        );
        assert!(token(&global(&["--token", ""])).expect("ok").is_none());
        let from_flag = token(&global(&["--token", "s.flag"])).expect("ok");
        assert_eq!(from_flag.expect("some").expose_secret(), "s.flag");
    }

    #[test]
    fn purpose_flags_become_a_purpose() {
        let none = PurposeArgs {
            purpose: None,
            reason: None,
        };
        assert_eq!(purpose(&none), None);
        let er = PurposeArgs {
            purpose: Some("emergency".into()),
            reason: Some("ER bed 4".into()),
        };
        assert_eq!(purpose(&er), Some(Purpose::emergency("ER bed 4")));
        let plain = PurposeArgs {
            purpose: Some("treatment".into()),
            reason: None,
        };
        assert_eq!(purpose(&plain), Some(Purpose::new("treatment")));
    }

    #[test]
    fn ciphertext_input_accepts_text_and_base64_binary() {
        assert_eq!(ciphertext_input(b" cipherd:v1:AAAA\n"), b"cipherd:v1:AAAA");
        assert_eq!(ciphertext_input(b"AQAAAAE=\n"), [1, 0, 0, 0, 1]);
        // Neither form: passed through for the server to refuse opaquely.
        assert_eq!(ciphertext_input(b"garbage!"), b"garbage!");
    }

    #[test]
    fn base64_input_errors_name_the_reason() {
        assert_eq!(decode_base64_input(b"aGk=\n").expect("valid"), b"hi");
        let err = decode_base64_input(b"not base64").expect_err("invalid");
        assert_eq!(err.reason, "INVALID_INPUT");
    }

    #[test]
    fn ciphertext_output_forms() {
        assert_eq!(
            ciphertext_output(b"cipherd:v1:AA==", false).expect("text"),
            "cipherd:v1:AA=="
        );
        assert_eq!(ciphertext_output(&[1, 0], true).expect("binary"), "AQA=");
        assert_eq!(
            ciphertext_output(&[0xff], false)
                .expect_err("not utf-8")
                .reason,
            "PROTOCOL"
        );
    }
}
