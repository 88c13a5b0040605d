//! Codec throughput: typed decode and encode of a DELEGATION_START carrying a DM Account and of a
//! 50-command SyncML DM message, beside quick-xml's raw event reader scanning the same bytes.
//!
//! Run: `cargo run --release -p dm-protocol --example codec_bench` (figures, not assertions).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use dm_protocol::{delegation, syncml};

/// Each figure is the median of `ROUNDS` rounds of `ROUND` each; the raw scan and the typed decode run
/// interleaved, round by round, so that a slow patch of this shared 2-core machine hits both alike.
const ROUNDS: usize = 9;
const ROUND: Duration = Duration::from_millis(250);

/// Runs `f` repeatedly for about `ROUND` and returns iterations per second.
fn rate(f: &mut impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < ROUND {
        for _ in 0..50 {
            f();
        }
        n += 50;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Medians of the rates of each closure, measured in interleaved rounds.
fn measure<const N: usize>(fs: &mut [&mut dyn FnMut(); N]) -> [f64; N] {
    for f in fs.iter_mut() {
        for _ in 0..100 {
            f();
        }
    }
    let mut rates: [Vec<f64>; N] = std::array::from_fn(|_| Vec::new());
    for _ in 0..ROUNDS {
        for (f, r) in fs.iter_mut().zip(rates.iter_mut()) {
            r.push(rate(f));
        }
    }
    rates.map(median)
}

/// quick-xml's reader over the same bytes, touching every event: the floor any XML decoder pays.
fn raw_scan(text: &str) -> usize {
    let mut reader = quick_xml::NsReader::from_str(text);
    let mut events = 0;
    loop {
        match reader.read_resolved_event() {
            Ok((_, quick_xml::events::Event::Eof)) | Err(_) => return events,
            Ok((ns, ev)) => {
                black_box((&ns, &ev));
                events += 1;
            }
        }
    }
}

fn syncml_50_commands() -> String {
    let mut body = String::new();
    for i in 0..50 {
        body.push_str(&format!(
            "<Replace><CmdID>{}</CmdID><Item><Target><LocURI>./Vendor/Acme/Apps/app{i}/Setting</LocURI></Target>\
             <Meta><Format xmlns=\"syncml:metinf\">chr</Format><Type xmlns=\"syncml:metinf\">text/plain</Type></Meta>\
             <Data>value-{i}</Data></Item></Replace>\n",
            i + 2
        ));
    }
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<SyncML xmlns=\"SYNCML:SYNCML1.2\"><SyncHdr><VerDTD>1.2</VerDTD>\
         <VerProto>DM/1.2</VerProto><SessionID>1A2B</SessionID><MsgID>2</MsgID>\
         <Target><LocURI>IMEI:490154203237518</LocURI></Target><Source><LocURI>https://dms1.operator.example/dm</LocURI></Source>\
         </SyncHdr><SyncBody>\n{body}<Final/></SyncBody></SyncML>\n"
    )
}

fn report(name: &str, text: &str, typed_decode: impl Fn(&str), typed_encode: impl Fn()) {
    let bytes = text.len() as f64;
    let mut scan = || {
        black_box(raw_scan(black_box(text)));
    };
    let mut decode = || typed_decode(black_box(text));
    let mut encode = || typed_encode();
    let mut both = || {
        typed_decode(black_box(text));
        typed_encode();
    };
    let [scan, decode, encode, both] =
        measure(&mut [&mut scan, &mut decode, &mut encode, &mut both]);
    let line = |what: &str, per_sec: f64| {
        println!(
            "  {what:<20} {per_sec:>10.0} msg/s {:>8.1} MB/s",
            per_sec * bytes / 1e6
        );
    };
    println!("{name} ({bytes} bytes)");
    line("quick-xml raw scan", scan);
    line("typed decode", decode);
    line("typed encode", encode);
    line("decode + encode", both);
    println!(
        "  typed decode / raw scan = {:.0}% (target: at least 40%)",
        100.0 * decode / scan
    );
}

fn main() {
    let start = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/start.xml"
    ))
    .expect("examples/start.xml");
    let start_msg = delegation::decode(start.as_bytes()).expect("valid example");
    report(
        "DELEGATION_START with a DM Account",
        &start,
        |t| {
            black_box(delegation::decode(t.as_bytes()).expect("valid"));
        },
        || {
            black_box(delegation::encode(black_box(&start_msg)));
        },
    );
    let sync = syncml_50_commands();
    let sync_msg = syncml::decode(sync.as_bytes()).expect("valid SyncML");
    assert_eq!(sync_msg.body.commands.len(), 50);
    report(
        "SyncML DM message with 50 commands",
        &sync,
        |t| {
            black_box(syncml::decode(t.as_bytes()).expect("valid"));
        },
        || {
            black_box(syncml::encode(black_box(&sync_msg)));
        },
    );
}
