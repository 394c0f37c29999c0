//! One value at a time: `encrypt`, `decrypt`, `rewrap`, `datakey` (the `TransitService`
//! service's unary RPCs).
//!
//! Values come from the argument or, when it is omitted, from stdin. Plaintext from
//! stdin is taken byte for byte (nothing is trimmed), so `decrypt` gives back exactly
//! what was encrypted (on a terminal, a missing final newline is added for the
//! prompt's sake); ciphertexts are trimmed, since the format has no whitespace.

use std::io::IsTerminal as _;

use cipherd_client::{DataKeyOptions, EncryptOptions, RewrapOptions};

use super::{
    Ctx, ciphertext_input, ciphertext_output, decode_base64_input, purpose, read_stdin_all,
};
use crate::{
    cli::{DatakeyArgs, DecryptArgs, EncryptArgs, RewrapArgs},
    output::{CiphertextView, DataKeyView, PlaintextView},
};

/// `encrypt KEY [PLAINTEXT]`.
pub(super) async fn encrypt(ctx: &Ctx, args: EncryptArgs) -> anyhow::Result<()> {
    let input = match args.plaintext {
        Some(p) => p.expose().as_bytes().to_vec(),
        None => read_stdin_all("plaintext").await?,
    };
    let plaintext = if args.base64 {
        decode_base64_input(&input)?
    } else {
        input
    };
    let options = EncryptOptions {
        associated_data: args.binding.associated_data().into(),
        context: args.binding.context().into(),
        key_version: args.key_version,
        text: !args.binary,
    };
    let reply = ctx.client.encrypt(&args.key, plaintext, &options).await?;
    ctx.emit(&CiphertextView {
        ciphertext: ciphertext_output(&reply.ciphertext, args.binary)?,
        key_version: reply.key_version,
    })
}

/// `decrypt KEY [CIPHERTEXT]`.
pub(super) async fn decrypt(ctx: &Ctx, args: DecryptArgs) -> anyhow::Result<()> {
    let input = match args.ciphertext {
        Some(c) => c.into_bytes(),
        None => read_stdin_all("ciphertext").await?,
    };
    let reply = ctx
        .client
        .with_purpose(purpose(&args.purpose))
        .decrypt(
            &args.key,
            ciphertext_input(&input),
            args.binding.associated_data(),
            args.binding.context(),
        )
        .await?;
    ctx.emit(&PlaintextView {
        plaintext: reply.plaintext.to_vec(),
        key_version: reply.key_version,
        base64: args.base64,
        terminal_newline: std::io::stdout().is_terminal(),
    })
}

/// `rewrap KEY [CIPHERTEXT]`: the server decrypts and re-encrypts; the plaintext
/// never reaches this process.
pub(super) async fn rewrap(ctx: &Ctx, args: RewrapArgs) -> anyhow::Result<()> {
    let input = match &args.ciphertext {
        Some(c) => c.clone().into_bytes(),
        None => read_stdin_all("ciphertext").await?,
    };
    let options = RewrapOptions {
        associated_data: args.binding.associated_data().into(),
        context: args.binding.context().into(),
        destination_key: args.to.clone(),
        destination_context: args.dest_context().into(),
        text: !args.binary,
    };
    let reply = ctx
        .client
        .with_purpose(purpose(&args.purpose))
        .rewrap(&args.key, ciphertext_input(&input), &options)
        .await?;
    ctx.emit(&CiphertextView {
        ciphertext: ciphertext_output(&reply.ciphertext, args.binary)?,
        key_version: reply.key_version,
    })
}

/// `datakey KEY`: a fresh data key, in plaintext (unless `--wrapped-only`) and
/// wrapped under KEY.
pub(super) async fn datakey(ctx: &Ctx, args: DatakeyArgs) -> anyhow::Result<()> {
    let options = DataKeyOptions {
        bits: args.bits.get(),
        wrapped_only: args.wrapped_only,
        associated_data: args.binding.associated_data().into(),
        context: args.binding.context().into(),
        text: !args.binary,
    };
    let reply = ctx
        .client
        .with_purpose(purpose(&args.purpose))
        .generate_data_key(&args.key, &options)
        .await?;
    ctx.emit(&DataKeyView {
        plaintext: (!args.wrapped_only).then(|| reply.plaintext.to_vec()),
        ciphertext: ciphertext_output(&reply.ciphertext, args.binary)?,
        key_version: reply.key_version,
    })
}
