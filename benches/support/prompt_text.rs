//! Prompt-sized text shared by the redaction and scan benches: ordinary English with a few
//! matches, so the numbers reflect the common case (mostly clean text) rather than a worst case.

/// About `bytes` of prose; every ~2 KB paragraph carries one e-mail, one phone number and one
/// employee id, so the redaction pass has real work but most text is clean.
pub fn prompt(bytes: usize) -> String {
    const CLEAN: &str = "Please summarise the customer's ticket below and suggest a polite reply. \
        The order arrived two days late, the box was damaged, and the support chat closed before \
        anyone answered. They would like a refund or a replacement, whichever is faster, and they \
        mention that they have been a customer for six years without any complaint so far. ";
    const WITH_PII: &str = "Contact: jane.doe@example.com, phone 415-555-0134, staff EMP-204518. ";
    let mut text = String::with_capacity(bytes + 512);
    let mut i = 0;
    while text.len() < bytes {
        text.push_str(CLEAN);
        if i % 6 == 5 {
            text.push_str(WITH_PII);
        }
        i += 1;
    }
    text
}
