//! `ls`, `status`, `scale`, `delete`, `node` and `signal`: one RPC each, its reply printed as a
//! table or JSON.

use std::io::Write;
use std::time::SystemTime;

use super::Outcome;
use crate::args::{ConnectArgs, DeleteArgs, Format, LsArgs, ScaleArgs};
use crate::client;
use crate::render;
use crate::views::{DeleteView, NodeView, ScaleView, ServiceView, SignalView};

pub async fn ls(
    conn: &ConnectArgs,
    format: Format,
    args: &LsArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let selector = args.selector.as_deref().unwrap_or("");
    let mut services = client::connect(conn).await?.list_all(selector).await?;
    services.sort_by(|a, b| a.name.cmp(&b.name));
    for s in &mut services {
        s.instances.sort_by_key(|i| i.index);
    }
    match format {
        Format::Json => {
            let views: Vec<ServiceView> = services.iter().map(ServiceView::from).collect();
            render::write_json(out, &views)?;
        }
        Format::Table if services.is_empty() => writeln!(err, "no services")?,
        Format::Table => render::write_services(out, &services)?,
    }
    Ok(Outcome::Success)
}

pub async fn status(
    conn: &ConnectArgs,
    format: Format,
    name: &str,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let mut service = client::connect(conn).await?.get(name).await?;
    service.instances.sort_by_key(|i| i.index);
    match format {
        Format::Json => render::write_json(out, &ServiceView::from(&service))?,
        Format::Table => render::write_status(out, &service, SystemTime::now())?,
    }
    Ok(Outcome::Success)
}

pub async fn scale(
    conn: &ConnectArgs,
    format: Format,
    args: &ScaleArgs,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let resp = client::connect(conn)
        .await?
        .scale(
            &args.name,
            args.replicas,
            args.force,
            args.expected_revision,
        )
        .await?;
    match format {
        Format::Json => render::write_json(out, &ScaleView::from(&resp))?,
        Format::Table => render::write_scale(out, &resp)?,
    }
    Ok(Outcome::Success)
}

pub async fn delete(
    conn: &ConnectArgs,
    format: Format,
    args: &DeleteArgs,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let resp = client::connect(conn)
        .await?
        .delete(&args.name, args.force, args.expected_revision)
        .await?;
    match format {
        Format::Json => render::write_json(out, &DeleteView::from(&resp))?,
        Format::Table => render::write_delete(out, &resp)?,
    }
    Ok(Outcome::Success)
}

pub async fn node(
    conn: &ConnectArgs,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let info = client::connect(conn).await?.node().await?;
    match format {
        Format::Json => render::write_json(out, &NodeView::from(&info))?,
        Format::Table => render::write_node(out, &info)?,
    }
    Ok(Outcome::Success)
}

/// `NAME/INDEX` as the agent names instances (`NAME-INDEX`); anything else as given.
pub fn instance_id(arg: &str) -> String {
    match arg.rsplit_once('/') {
        Some((name, index)) if !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{name}-{index}")
        }
        _ => arg.to_string(),
    }
}

pub async fn signal(
    conn: &ConnectArgs,
    format: Format,
    instance: &str,
    signal: &str,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let resp = client::connect(conn)
        .await?
        .signal(&instance_id(instance), signal)
        .await?;
    match format {
        Format::Json => render::write_json(out, &SignalView::from(&resp))?,
        Format::Table => writeln!(
            out,
            "{}: sent {} to pid {}",
            resp.instance, resp.signal, resp.pid
        )?,
    }
    Ok(Outcome::Success)
}

#[cfg(test)]
mod tests {
    use super::instance_id;

    #[test]
    fn instance_ids() {
        assert_eq!(instance_id("web/2"), "web-2");
        assert_eq!(instance_id("web-2"), "web-2");
        assert_eq!(instance_id("a-b/10"), "a-b-10");
        assert_eq!(instance_id("web/x"), "web/x");
    }
}
