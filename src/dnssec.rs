//! What a forwarder that passes DNSSEC on without validating (RFC 4035 §3.2, RFC 6840 §5) does
//! with the records of an answer, as pure functions: which records a client without DO must not
//! get, and the answer's sections with and without them.
//!
//! The rules the rest of the program follows (README, "DNSSEC"):
//! - DO and CD go upstream as the client sent them (`upstream`); AD is always set in upstream
//!   queries, so the upstream says whether it validated the data (RFC 6840 §5.7).
//! - RRSIG, NSEC, NSEC3 and DS records reach a client only if it set DO, or asked for that type
//!   (RFC 4035 §3.2.1), in every section, positive and negative answers alike.
//! - AD reaches a client only if the upstream is trusted (`upstream.trust_ad`) and set it, and the
//!   client set DO or AD (RFC 6840 §5.7).
//! - Consul answers are unsigned, as Consul's own: no DNSSEC records, no AD.

use hickory_proto::rr::{Record, RecordType};

use crate::header;

/// Is `record` a DNSSEC record a client without DO must not get: an RRSIG, NSEC, NSEC3 or DS
/// that it did not ask for by type (RFC 4035 §3.2.1)?
pub(crate) fn is_proof_for(record: &Record, qtype: RecordType) -> bool {
    let rtype = record.record_type();
    rtype != qtype && header::is_dnssec_proof(u16::from(rtype))
}

/// The three record sections of an answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Sections {
    pub(crate) answers: Vec<Record>,
    pub(crate) authorities: Vec<Record>,
    pub(crate) additionals: Vec<Record>,
}

impl Sections {
    fn all(&self) -> impl Iterator<Item = &Record> {
        self.answers
            .iter()
            .chain(&self.authorities)
            .chain(&self.additionals)
    }

    /// Does any section hold a record a client without DO must not get?
    pub(crate) fn has_proofs(&self, qtype: RecordType) -> bool {
        self.all().any(|r| is_proof_for(r, qtype))
    }

    /// The sections as a client without DO gets them.
    pub(crate) fn without_proofs(&self, qtype: RecordType) -> Sections {
        let keep = |records: &[Record]| -> Vec<Record> {
            records
                .iter()
                .filter(|r| !is_proof_for(r, qtype))
                .cloned()
                .collect()
        };
        Sections {
            answers: keep(&self.answers),
            authorities: keep(&self.authorities),
            additionals: keep(&self.additionals),
        }
    }

    /// Record counts, as the header holds them after the question count.
    pub(crate) fn counts(&self) -> [usize; 3] {
        [
            self.answers.len(),
            self.authorities.len(),
            self.additionals.len(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, NULL, SOA};
    use hickory_proto::rr::{Name, RData};

    fn name(s: &str) -> Name {
        Name::from_ascii(s).expect("name")
    }

    /// A DNSSEC record as opaque rdata: what it holds does not matter here.
    fn opaque(owner: &str, rtype: RecordType) -> Record {
        Record::from_rdata(
            name(owner),
            60,
            RData::Unknown {
                code: rtype,
                rdata: NULL::with(vec![1, 2, 3]),
            },
        )
    }

    #[test]
    fn proofs_are_left_out_unless_asked_for_by_type() {
        let a = Record::from_rdata(name("x.example."), 60, RData::A(A::new(192, 0, 2, 1)));
        let soa = Record::from_rdata(
            name("example."),
            60,
            RData::SOA(SOA::new(
                name("ns.example."),
                name("h.example."),
                1,
                2,
                3,
                4,
                5,
            )),
        );
        let sections = Sections {
            answers: vec![a.clone(), opaque("x.example.", RecordType::RRSIG)],
            authorities: vec![
                soa.clone(),
                opaque("example.", RecordType::NSEC),
                opaque("example.", RecordType::NSEC3),
                opaque("sub.example.", RecordType::DS),
            ],
            additionals: vec![opaque("ns.example.", RecordType::RRSIG)],
        };
        assert!(sections.has_proofs(RecordType::A));
        let plain = sections.without_proofs(RecordType::A);
        assert_eq!(plain.answers, [a]);
        assert_eq!(plain.authorities, [soa]);
        assert!(plain.additionals.is_empty());
        assert!(!plain.has_proofs(RecordType::A));
        assert_eq!(plain.counts(), [1, 1, 0]);
        // Asked for by type: kept (their own RRSIGs are not).
        let ds = Sections {
            answers: vec![
                opaque("sub.example.", RecordType::DS),
                opaque("sub.example.", RecordType::RRSIG),
            ],
            ..Sections::default()
        };
        assert_eq!(ds.without_proofs(RecordType::DS).counts(), [1, 0, 0]);
        assert_eq!(ds.without_proofs(RecordType::RRSIG).counts(), [1, 0, 0]);
        // DNSKEY is not a proof: only ever in an answer to a DNSKEY question.
        let keys = Sections {
            answers: vec![opaque("example.", RecordType::DNSKEY)],
            ..Sections::default()
        };
        assert!(!keys.has_proofs(RecordType::A));
    }
}
