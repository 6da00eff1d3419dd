//! Reverse names: the address a full-length `in-addr.arpa.` (RFC 1035 §3.5) or `ip6.arpa.`
//! (RFC 3596 §2.5) name spells, read as Consul's DNS reads them (`dnsutil.IPFromARPA`: exactly 4
//! decimal labels, or exactly 32 hex nibbles). A shorter name (a network such as
//! `10.in-addr.arpa.`), a longer one, or a label that is not an address part is no address: such
//! names are forwarded like any other name.
//!
//! Both readers work without allocating: the wire one runs on the hot path, for PTR questions
//! only, so a query for any other type costs one comparison.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::{DNSClass, Name, RecordType};

use crate::answer::Question;

/// Labels of a full IPv4 reverse name: 4 octets, `in-addr`, `arpa`.
const IPV4_NAME_LABELS: usize = 6;
/// Labels of a full IPv6 reverse name: 32 nibbles, `ip6`, `arpa`.
const IPV6_NAME_LABELS: usize = 34;

/// The address of a reverse question that Consul's DNS would answer from its catalog: a PTR (or
/// ANY, which Consul answers with the PTR record) question of class IN (or ANY) for a full-length
/// reverse name.
pub(crate) fn question_address(q: &Question) -> Option<IpAddr> {
    let asks_ptr = matches!(q.qtype, RecordType::PTR | RecordType::ANY);
    let class_in = matches!(q.qclass, DNSClass::IN | DNSClass::ANY);
    if asks_ptr && class_in {
        ip_from_name(&q.name)
    } else {
        None
    }
}

/// [`question_address`] for the hot path: `qtype`, and `key`, the question in wire format with
/// its name lowercased (name, type, class). Only PTR: ANY never takes the hot path.
pub(crate) fn wire_question_address(qtype: u16, key: &[u8]) -> Option<IpAddr> {
    if qtype != u16::from(RecordType::PTR) || key.len() < 4 {
        return None;
    }
    let (name, type_class) = key.split_at(key.len() - 4);
    let class = u16::from_be_bytes([type_class[2], type_class[3]]);
    if class != u16::from(DNSClass::IN) && class != u16::from(DNSClass::ANY) {
        return None;
    }
    ip_from_wire(name)
}

/// The address `name` spells, if it is a full-length reverse name.
pub(crate) fn ip_from_name(name: &Name) -> Option<IpAddr> {
    ip_from_labels(name.iter())
}

/// The address an uncompressed wire-format name spells (root label included), if it is a
/// full-length reverse name.
pub(crate) fn ip_from_wire(name: &[u8]) -> Option<IpAddr> {
    // Cheap rejection of every name that does not end in `arpa.`.
    let tail = name.len().checked_sub(6).map(|at| &name[at..]);
    if !tail.is_some_and(|t| t.eq_ignore_ascii_case(b"\x04arpa\x00")) {
        return None;
    }
    ip_from_labels(WireLabels { rest: name })
}

/// The labels of an uncompressed wire-format name, root excluded; stops at anything malformed
/// (which then is no address: a label would be missing or cut).
struct WireLabels<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for WireLabels<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let (&len, rest) = self.rest.split_first()?;
        let label = rest.get(..usize::from(len)).filter(|l| !l.is_empty())?;
        self.rest = &rest[label.len()..];
        Some(label)
    }
}

fn ip_from_labels<'a>(labels: impl Iterator<Item = &'a [u8]>) -> Option<IpAddr> {
    let mut parts: [&[u8]; IPV6_NAME_LABELS] = [&[]; IPV6_NAME_LABELS];
    let mut count = 0;
    for label in labels {
        *parts.get_mut(count)? = label;
        count += 1;
    }
    let parts = &parts[..count];
    let [address @ .., zone, arpa] = parts else {
        return None;
    };
    if !arpa.eq_ignore_ascii_case(b"arpa") {
        return None;
    }
    match count {
        IPV4_NAME_LABELS if zone.eq_ignore_ascii_case(b"in-addr") => {
            let mut octets = [0u8; 4];
            // The name lists the octets last first.
            for (octet, label) in octets.iter_mut().rev().zip(address) {
                *octet = decimal_octet(label)?;
            }
            Some(IpAddr::V4(Ipv4Addr::from(octets)))
        }
        IPV6_NAME_LABELS if zone.eq_ignore_ascii_case(b"ip6") => {
            let mut bits: u128 = 0;
            // The name lists the nibbles least significant first.
            for (shift, label) in address.iter().enumerate() {
                bits |= u128::from(hex_nibble(label)?) << (4 * shift);
            }
            Some(IpAddr::V6(Ipv6Addr::from(bits)))
        }
        _ => None,
    }
}

/// `0` to `255` in decimal, without leading zeros (Go's `net.ParseIP` refuses them, so Consul
/// never matches such a name).
fn decimal_octet(label: &[u8]) -> Option<u8> {
    if label.is_empty() || label.len() > 3 || (label.len() > 1 && label[0] == b'0') {
        return None;
    }
    let mut value: u16 = 0;
    for &b in label {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value * 10 + u16::from(b - b'0');
    }
    u8::try_from(value).ok()
}

/// One hexadecimal digit, either case.
fn hex_nibble(label: &[u8]) -> Option<u8> {
    match label {
        [b] => char::from(*b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok()),
        _ => None,
    }
}

/// The full-length reverse name of `ip` (what `dig -x` asks).
#[cfg(test)]
pub(crate) fn reverse_name(ip: IpAddr) -> Name {
    let text = match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.in-addr.arpa.")
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mut s = String::new();
            for shift in 0..32 {
                let nibble = (bits >> (4 * shift)) & 0xf;
                s.push_str(&format!("{nibble:x}."));
            }
            s.push_str("ip6.arpa.");
            s
        }
    };
    Name::from_ascii(text).expect("a reverse name is a valid name")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::push_name;

    /// Both readers on `text`, whose labels may hold any byte (hickory's parser refuses some).
    fn both(text: &str) -> Option<IpAddr> {
        let labels = text.trim_end_matches('.').split('.').map(str::as_bytes);
        let mut name = Name::from_labels(labels).expect("name");
        name.set_fqdn(true);
        let mut wire = Vec::new();
        push_name(&mut wire, &name.to_lowercase());
        let from_wire = ip_from_wire(&wire);
        let from_name = ip_from_name(&name);
        assert_eq!(from_wire, from_name, "{text}: both readers agree");
        from_name
    }

    #[test]
    fn full_length_names_are_addresses() {
        for (name, ip) in [
            ("2.0.0.127.in-addr.arpa.", "127.0.0.2"),
            ("4.3.2.1.IN-ADDR.ARPA.", "1.2.3.4"),
            ("0.0.0.0.in-addr.arpa.", "0.0.0.0"),
            // Consul's own tests.
            (
                "9.2.3.8.2.4.0.0.0.0.f.f.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.",
                "2001:db8::ff00:42:8329",
            ),
            (
                "2.4.2.4.2.4.2.4.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.IP6.ARPA.",
                "::4242:4242",
            ),
        ] {
            assert_eq!(both(name), Some(ip.parse().expect("ip")), "{name}");
        }
        for ip in [
            "10.1.2.3",
            "255.255.255.255",
            "fe80::1",
            "2001:db8::abcd:ef01",
        ] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(both(&reverse_name(ip).to_ascii()), Some(ip), "{ip}");
        }
    }

    #[test]
    fn partial_long_and_malformed_names_are_not() {
        for text in [
            "in-addr.arpa.",
            "arpa.",
            "10.in-addr.arpa.",
            "3.2.1.in-addr.arpa.",
            "5.4.3.2.1.in-addr.arpa.",
            "256.0.0.10.in-addr.arpa.",
            "01.0.0.10.in-addr.arpa.",
            "1.0.0.1a.in-addr.arpa.",
            "-1.0.0.10.in-addr.arpa.",
            "1.0.0.1 .in-addr.arpa.",
            "1.0.0.1\u{0}.in-addr.arpa.",
            "1.0.0.10.ip6.arpa.",
            "1.0.0.10.in-addr.arpa.com.",
            "1.0.0.10.in-addrx.arpa.",
            "1.0.0.10.example.",
            "8.b.d.0.1.0.0.2.ip6.arpa.",
            "g.2.3.8.2.4.0.0.0.0.f.f.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.",
            "92.3.8.2.4.0.0.0.0.f.f.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.",
            "0.9.2.3.8.2.4.0.0.0.0.f.f.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.",
            "2.0.0.127.in-addr.arpa.ip6.arpa.",
        ] {
            assert_eq!(both(text), None, "{text}");
        }
        let long = format!("{}in-addr.arpa.", "1.".repeat(120));
        assert_eq!(both(&long), None);
    }

    #[test]
    fn wire_names_that_are_cut_or_odd_are_not() {
        assert_eq!(ip_from_wire(b""), None);
        assert_eq!(ip_from_wire(b"\x00"), None);
        assert_eq!(ip_from_wire(b"\x04arpa"), None);
        // A length byte that runs past the end.
        assert_eq!(
            ip_from_wire(b"\x09\x011\x011\x011\x011\x07in-addr\x04arpa\x00"),
            None
        );
    }

    #[test]
    fn only_ptr_and_any_questions_of_class_in_count() {
        let q = |qtype, qclass| Question {
            name: Name::from_ascii("2.0.0.127.in-addr.arpa.").expect("name"),
            qtype,
            qclass,
        };
        let ip = Some("127.0.0.2".parse().expect("ip"));
        assert_eq!(question_address(&q(RecordType::PTR, DNSClass::IN)), ip);
        assert_eq!(question_address(&q(RecordType::ANY, DNSClass::IN)), ip);
        assert_eq!(question_address(&q(RecordType::A, DNSClass::IN)), None);
        assert_eq!(question_address(&q(RecordType::PTR, DNSClass::CH)), None);
        let mut key = Vec::new();
        push_name(&mut key, &q(RecordType::PTR, DNSClass::IN).name);
        key.extend_from_slice(&[0, 12, 0, 1]);
        assert_eq!(wire_question_address(12, &key), ip);
        assert_eq!(wire_question_address(1, &key), None);
        let last = key.len() - 1;
        key[last] = 3;
        assert_eq!(wire_question_address(12, &key), None, "class CH");
    }
}
