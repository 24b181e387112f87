//! The fuzz entry points ([`usher::fuzz`]) on the stable toolchain: a seeded
//! mutator grows hostile inputs from the wire transcripts of the cases, so
//! every test run feeds the parsers a few hundred thousand odd inputs. The
//! same entry points run under cargo-fuzz from `fuzz/`.

use usher::fuzz::{imap_prelogin, smtp_prelogin};

const IMAP_SEEDS: &[&[u8]] = &[
    b"a LOGIN alice secret\r\n",
    b"a LOGIN {5+}\r\nalice {6}\r\nsecret\r\n",
    b"a LOGIN \"al\\\"ice\" \"s\\\\ecret\"\r\nb NOOP\r\n",
    b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n",
    b"a AUTHENTICATE PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\n*\r\n",
    b"a STARTTLS\r\nb CAPABILITY\r\n",
    b"a ID (\"name\" \"x\" \"x-originating-ip\" \"1.2.3.4\")\r\n",
    b"a LOGIN {18446744073709551615}\r\n",
    b"a LOGIN {4294967296+}\r\nx\r\n",
];

const SMTP_SEEDS: &[&[u8]] = &[
    b"EHLO client.example\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
    b"AUTH LOGIN YWxpY2U=\r\nc2VjcmV0\r\n*\r\n=\r\n",
    b"MAIL FROM:<a@example.com> BODY=8BITMIME SMTPUTF8\r\nRCPT TO:<b@example.com>\r\nDATA\r\n",
    b"250-backend.example\r\n250-SIZE 10240000\r\n250-CHUNKING\r\n250 8BITMIME\r\n",
    b"220 ready\r\n250-x\r\n250 y\r\n535 5.7.8 no\r\n",
    b"250-no final line\r\n250-still\r\n",
    b"XCLIENT ADDR=IPV6:::1 LOGIN=a+2Bb\r\nBDAT 100 LAST\r\n",
];

/// xorshift64*: deterministic, so a failure reproduces from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b"{",
    b"}",
    b"+}",
    b"{0}",
    b"{99999999999999999999}",
    b"\"",
    b"\\",
    b"*",
    b"=",
    b"\0",
    b"\xff",
    b"\xc3\xa9",
    b" ",
    b"(",
    b")",
    b"-",
    b"250-",
    b"250 ",
];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, seeds: &[&[u8]]) {
    for _ in 0..=rng.below(4) {
        let at = rng.below(input.len() + 1);
        match rng.below(6) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] = rng.next() as u8;
            }
            1 if !input.is_empty() => {
                let end = (at + rng.below(8)).min(input.len());
                input.drain(at.min(end)..end);
            }
            2 => {
                let piece = INTERESTING[rng.below(INTERESTING.len())];
                input.splice(at..at, piece.iter().copied());
            }
            3 => {
                let other = seeds[rng.below(seeds.len())];
                let from = rng.below(other.len());
                let to = (from + rng.below(other.len() - from + 1)).min(other.len());
                input.splice(at..at, other[from..to].iter().copied());
            }
            4 if input.len() < 4096 => {
                let copy = input[at..].to_vec();
                input.extend_from_slice(&copy);
            }
            _ => input.insert(at, rng.next() as u8),
        }
    }
    input.truncate(8192);
}

fn run(target: fn(&[u8]), seeds: &[&[u8]], rounds: usize, seed: u64) {
    let mut rng = Rng(seed);
    for s in seeds {
        target(s);
        // Every prefix: an attacker controls where a read ends.
        for n in 0..s.len() {
            target(&s[..n]);
        }
    }
    for round in 0..rounds {
        let mut input = seeds[rng.below(seeds.len())].to_vec();
        for _ in 0..=rng.below(8) {
            mutate(&mut rng, &mut input, seeds);
        }
        let result = std::panic::catch_unwind(|| target(&input));
        assert!(
            result.is_ok(),
            "round {round} (seed {seed}) panicked on {:?}",
            String::from_utf8_lossy(&input)
        );
    }
}

#[test]
fn imap_prelogin_parsers_survive_mutated_input() {
    run(imap_prelogin, IMAP_SEEDS, 100_000, 0x0005_eed1);
}

#[test]
fn smtp_parsers_survive_mutated_input() {
    run(smtp_prelogin, SMTP_SEEDS, 100_000, 0x0005_eed2);
}
