//! Redaction of personal data in ticket excerpts, and cutting them to length.
//!
//! What is replaced, in this order:
//! - e-mail addresses → `[email]`;
//! - card-like numbers, 13 to 19 digits optionally separated by single spaces or dashes →
//!   `[card]`. The Luhn checksum is deliberately *not* required: an alert channel is the wrong
//!   place for a 16-digit number whatever it is, and over-redacting an order number costs less
//!   than leaking a card number with a typo in it;
//! - phone numbers, 7 to 15 digits with an optional leading `+` and the usual separators
//!   (spaces, dots, dashes, parentheses) → `[phone]`. Dates such as `2026-11-28` are left alone.
//!
//! Redaction runs on the whole text before it is cut, so a cut never leaves half an address
//! behind.

use std::sync::LazyLock;

use regex::Regex;

// Constant patterns, compiled by the unit tests: they cannot fail at run time.
#[allow(clippy::expect_used)]
static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
        .expect("email pattern")
});
#[allow(clippy::expect_used)]
static CARD: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b\d(?:[ \-]?\d){12,18}\b").expect("card pattern"));
#[allow(clippy::expect_used)]
static PHONE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?:\+\s?)?\(?\b\d[\d\s().\-]{5,}\d\b").expect("phone pattern"));
#[allow(clippy::expect_used)]
static DATE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\d{4}-\d{2}-\d{2}$").expect("date pattern"));

/// `text` with e-mail addresses, card-like numbers and phone numbers replaced.
pub fn redact(text: &str) -> String {
    let without_emails = EMAIL.replace_all(text, "[email]");
    let without_cards = CARD.replace_all(&without_emails, "[card]");
    PHONE
        .replace_all(&without_cards, |captures: &regex::Captures<'_>| {
            let candidate = &captures[0];
            let digits = candidate.chars().filter(char::is_ascii_digit).count();
            if (7..=15).contains(&digits) && !DATE.is_match(candidate.trim()) {
                "[phone]".to_owned()
            } else {
                candidate.to_owned()
            }
        })
        .into_owned()
}

/// `text` cut to at most `max_chars` characters (never inside a UTF-8 sequence), ending in `…`
/// when something was cut; the ellipsis counts towards the limit.
pub fn truncate(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_owned();
    }
    let keep = max_chars.saturating_sub(1);
    let mut cut: String = text.chars().take(keep).collect();
    cut.push('…');
    cut
}

/// Redacts, collapses whitespace runs to single spaces and cuts to `max_chars`.
pub fn excerpt(text: &str, max_chars: usize) -> String {
    let redacted = redact(text);
    let collapsed = redacted.split_whitespace().collect::<Vec<_>>().join(" ");
    truncate(&collapsed, max_chars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_redacted() {
        assert_eq!(
            redact("write to jane.doe+billing@example.co.uk or bob@corp.io."),
            "write to [email] or [email]."
        );
    }

    #[test]
    fn phone_numbers_are_redacted_in_their_usual_shapes() {
        for phone in [
            "+1 (415) 555-0123",
            "(415) 555-0123",
            "+44 20 7946 0958",
            "030 1234567",
            "415.555.0123",
            "555-0123-44",
        ] {
            assert_eq!(
                redact(&format!("call {phone} now")),
                "call [phone] now",
                "{phone}"
            );
        }
    }

    #[test]
    fn short_numbers_dates_and_amounts_stay() {
        let text = "order 12345 on 2026-11-28, refund 49.99 EUR, ticket #4521";
        assert_eq!(redact(text), text);
    }

    #[test]
    fn card_like_numbers_are_redacted_with_or_without_separators_and_luhn() {
        for card in [
            "4111111111111111",
            "4111 1111 1111 1111",
            "4111-1111-1111-1111",
            "378282246310005",
            // Fails the Luhn check: still redacted, by design.
            "1234567812345678",
        ] {
            assert_eq!(redact(&format!("card {card}.")), "card [card].", "{card}");
        }
    }

    #[test]
    fn truncation_counts_characters_not_bytes_and_marks_the_cut() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("exactly10!", 10), "exactly10!");
        assert_eq!(truncate("abcdefghijkl", 5), "abcd…");
        // Multi-byte characters: never split inside one.
        let cut = truncate("ééééééé", 4);
        assert_eq!(cut, "ééé…");
        assert_eq!(cut.chars().count(), 4);
    }

    #[test]
    fn excerpt_redacts_before_cutting() {
        // Cutting first would keep "jane.doe@exa", which still identifies someone.
        let text = "Hello, I am jane.doe@example.com and my card 4111 1111 1111 1111 was charged";
        let cut = excerpt(text, 20);
        assert_eq!(cut, "Hello, I am [email]…");
        assert!(!excerpt(text, 200).contains("4111"));
    }
}
