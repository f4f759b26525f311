//! `defibctl`: the operator's view of a defib controller over its REST API
//! (`controller::api`). Human tables by default, the API's JSON with `--json`.
pub mod cli;
pub mod client;
pub mod render;
pub mod table;
pub mod time;

use std::io::Write;

use serde::de::DeserializeOwned;

use cli::{Cli, Cmd, OnOff};
use client::{segment, Client, CtlError};

/// Runs one command, writing its output to `out`.
pub fn run(cli: &Cli, out: &mut dyn Write) -> Result<(), CtlError> {
    let token = cli
        .token_file
        .as_deref()
        .map(Client::read_token)
        .transpose()?;
    let tls = cli.ca_file.as_deref().map(Client::trusting).transpose()?;
    let client = Client::new(&cli.url, token, tls);
    let text = match &cli.command {
        Cmd::Hosts {
            host: Some(action),
            target: Some(host),
            key_out,
        } if action == "enroll" || action == "revoke" => enrollment(
            &client,
            cli.json,
            action == "enroll",
            host,
            key_out.as_deref(),
        )?,
        Cmd::Hosts {
            host: Some(action),
            target: Some(_),
            ..
        } => {
            return Err(CtlError::Local(format!(
                "unknown hosts action {action:?}: use `hosts enroll HOST` or `hosts revoke HOST`"
            )))
        }
        Cmd::Hosts {
            host: None,
            target: None,
            ..
        } => show(&client, cli.json, "/v1/hosts", render::hosts)?,
        Cmd::Hosts { host: None, .. } => {
            return Err(CtlError::Local("a host id is missing".into()))
        }
        Cmd::Hosts {
            host: Some(h),
            target: None,
            ..
        } => show(
            &client,
            cli.json,
            &format!("/v1/hosts/{}", segment(h)),
            render::host,
        )?,
        Cmd::Vms { host } => {
            let path = match host {
                Some(h) => format!("/v1/vms?host={}", segment(h)),
                None => "/v1/vms".into(),
            };
            show(&client, cli.json, &path, render::vms)?
        }
        Cmd::Incidents { id: None } => show(&client, cli.json, "/v1/incidents", render::incidents)?,
        Cmd::Incidents { id: Some(id) } => show(
            &client,
            cli.json,
            &format!("/v1/incidents/{}", segment(id)),
            render::incident,
        )?,
        Cmd::Alarms => show(&client, cli.json, "/v1/alarms", render::alarms)?,
        Cmd::Controllers => show(&client, cli.json, "/v1/controllers", render::controllers)?,
        Cmd::Maintenance { host, state } => {
            let on = *state == OnOff::On;
            let body = client.put_json(
                &format!("/v1/hosts/{}/maintenance", segment(host)),
                serde_json::json!({ "on": on }),
            )?;
            if cli.json {
                pretty(&body)?
            } else {
                format!("{host}: maintenance {}\n", if on { "on" } else { "off" })
            }
        }
        Cmd::Unfence { host } => {
            let body = client.post(&format!("/v1/hosts/{}/unfence", segment(host)))?;
            if cli.json {
                pretty(&body)?
            } else {
                format!("{host}: unfence accepted\n")
            }
        }
    };
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Enrolls or revokes `host`; an enrolled host's key is printed, or written to `key_out`
/// with mode 0600.
fn enrollment(
    client: &Client,
    json: bool,
    enroll: bool,
    host: &str,
    key_out: Option<&std::path::Path>,
) -> Result<String, CtlError> {
    let path = format!("/v1/hosts/{}/enrollment", segment(host));
    let body = if enroll {
        client.post(&path)?
    } else {
        client.delete(&path)?
    };
    let answer: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| CtlError::BadResponse(format!("enrollment answer is not JSON: {e}")))?;
    let key = answer.get("key").and_then(|k| k.as_str());
    if let (Some(path), Some(key)) = (key_out, key) {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| CtlError::Local(format!("writing {}: {e}", path.display())))?;
        f.write_all(key.as_bytes())
            .map_err(|e| CtlError::Local(format!("writing {}: {e}", path.display())))?;
        return Ok(format!(
            "{host}: enrolled; key written to {}\n",
            path.display()
        ));
    }
    if json {
        return pretty(&body);
    }
    Ok(match (enroll, key) {
        (true, Some(key)) => format!(
            "{host}: enrolled. Its key (install as the host's controller.key_file, mode 0600):\n{key}\n"
        ),
        (true, None) => format!("{host}: enrolled\n"),
        (false, _) => format!("{host}: revoked\n"),
    })
}

/// GETs `path` and renders it as a table, or as pretty JSON with `--json`.
fn show<T: DeserializeOwned>(
    client: &Client,
    json: bool,
    path: &str,
    render: fn(&T) -> String,
) -> Result<String, CtlError> {
    let body = client.get(path)?;
    if json {
        return pretty(&body);
    }
    let parsed: T = serde_json::from_str(&body).map_err(|e| {
        CtlError::BadResponse(format!(
            "unexpected answer from {}{path} (a different controller version?): {e}",
            client.base()
        ))
    })?;
    Ok(render(&parsed))
}

/// The API's JSON, as is (key order kept) but pretty.
fn pretty(body: &str) -> Result<String, CtlError> {
    let mut de = serde_json::Deserializer::from_str(body);
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::pretty(&mut out);
    serde_transcode::transcode(&mut de, &mut ser)
        .and_then(|()| de.end())
        .map_err(|e| CtlError::BadResponse(format!("the controller sent invalid JSON: {e}")))?;
    let mut s = String::from_utf8(out)
        .map_err(|e| CtlError::BadResponse(format!("the controller sent invalid JSON: {e}")))?;
    s.push('\n');
    Ok(s)
}
