//! A relay between two hosts of an existing pair of namespaces, for trying
//! things by hand: `relay NS LISTEN TARGET DELAY_MS`; Ctrl-D ends it,
//! lines `drop`, `reset`, `half`, `heal` cut and heal the link.

use std::io::BufRead;
use std::time::Duration;

use livepage_netlab::{Cut, Relay};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 5 {
        return Err("usage: relay NS LISTEN TARGET DELAY_MS".into());
    }
    let relay = Relay::start(
        &a[1],
        a[2].parse()?,
        a[3].parse()?,
        Duration::from_millis(a[4].parse()?),
    )?;
    eprintln!("relaying {} -> {}", relay.addr(), a[3]);
    for line in std::io::stdin().lock().lines() {
        match line?.trim() {
            "drop" => relay.cut(Cut::Drop),
            "reset" => relay.cut(Cut::Reset),
            "half" => relay.cut(Cut::HalfOpen),
            "heal" => relay.heal(),
            "stats" => eprintln!("{:?}", relay.stats()),
            other => eprintln!("unknown: {other}"),
        }
    }
    Ok(())
}
