//! Codec throughput: typed decode and encode of a DELEGATION_START carrying a DM Account and of a
//! 50-command SyncML DM message, beside quick-xml's raw event reader scanning the same bytes.
//!
//! Run: `cargo run --release -p dm-protocol --example codec_bench` (figures, not assertions).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use dm_protocol::{delegation, syncml};

const RUN_FOR: Duration = Duration::from_millis(1500);

/// Runs `f` repeatedly for about `RUN_FOR` and returns (iterations per second, MB/s of `bytes`).
fn measure(bytes: usize, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..200 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < RUN_FOR {
        for _ in 0..100 {
            f();
        }
        n += 100;
    }
    let secs = start.elapsed().as_secs_f64();
    let per_sec = n as f64 / secs;
    (per_sec, per_sec * bytes as f64 / 1e6)
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
    let bytes = text.len();
    let (scan_ps, scan_mb) = measure(bytes, || {
        black_box(raw_scan(black_box(text)));
    });
    let (dec_ps, dec_mb) = measure(bytes, || typed_decode(black_box(text)));
    let (enc_ps, enc_mb) = measure(bytes, &typed_encode);
    let (rt_ps, rt_mb) = measure(bytes, || {
        typed_decode(black_box(text));
        typed_encode();
    });
    println!("{name} ({bytes} bytes)");
    println!("  quick-xml raw scan   {scan_ps:>10.0} msg/s {scan_mb:>8.1} MB/s");
    println!("  typed decode         {dec_ps:>10.0} msg/s {dec_mb:>8.1} MB/s");
    println!("  typed encode         {enc_ps:>10.0} msg/s {enc_mb:>8.1} MB/s");
    println!("  decode + encode      {rt_ps:>10.0} msg/s {rt_mb:>8.1} MB/s");
    println!(
        "  typed decode / raw scan = {:.0}% (target: at least 40%)",
        100.0 * dec_mb / scan_mb
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
