//! Text that ends up on a pusher's terminal (git prints hook output as it
//! comes): Geo lag messages read from NATS and KV, and whatever a server
//! answered. Escape sequences there could rewrite the screen, set the window
//! title or hide text, so they are removed, as are control characters and
//! bidirectional overrides (which make text read other than it is).

/// `text` without escape sequences (CSI, OSC, DCS/APC/PM/SOS strings and
/// two-character escapes, 7- and 8-bit forms) and control characters; a tab
/// becomes a space, line breaks become spaces (callers split lines first).
pub fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                // CSI: parameters and intermediates up to a final byte.
                Some('[') => skip_csi(&mut chars),
                // String sequences: up to BEL or ST (ESC \).
                Some(']' | 'P' | '_' | '^' | 'X') => skip_string(&mut chars),
                // Two-character escapes (ESC c, ESC 7, ...) and lone ESC.
                _ => {}
            },
            '\u{9b}' => skip_csi(&mut chars),
            '\u{9d}' | '\u{90}' | '\u{9f}' | '\u{9e}' | '\u{98}' => skip_string(&mut chars),
            '\t' | '\n' | '\r' => out.push(' '),
            c if c.is_control() || is_bidi_control(c) => {}
            c => out.push(c),
        }
    }
    out
}

fn skip_csi(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    for c in chars.by_ref() {
        if ('\u{40}'..='\u{7e}').contains(&c) {
            return;
        }
        // A CSI never holds anything but these; stop at anything else so
        // ordinary text after a broken sequence survives.
        if !('\u{20}'..='\u{3f}').contains(&c) {
            return;
        }
    }
}

fn skip_string(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    while let Some(c) = chars.next() {
        match c {
            '\u{7}' | '\u{9c}' => return,
            '\u{1b}' if chars.peek() == Some(&'\\') => {
                chars.next();
                return;
            }
            _ => {}
        }
    }
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{61c}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_escapes_and_controls_keeps_text() {
        let cases = [
            (
                "Current replication lag: 3 seconds",
                "Current replication lag: 3 seconds",
            ),
            ("\u{1b}[2J\u{1b}[1;1Hgone", "gone"),
            ("red \u{1b}[31mtext\u{1b}[0m", "red text"),
            ("\u{1b}]0;owned title\u{7}after", "after"),
            (
                "\u{1b}]8;;http://evil\u{1b}\\link\u{1b}]8;;\u{1b}\\",
                "link",
            ),
            ("8-bit \u{9b}31mcsi", "8-bit csi"),
            ("bell\u{7} back\u{8}space del\u{7f}", "bell backspace del"),
            ("a\tb\r\nc", "a b  c"),
            ("abc\u{202e}fed", "abcfed"),
            ("\u{1b}Pdcs payload\u{1b}\\ok", "ok"),
            ("unterminated \u{1b}]title", "unterminated "),
            ("ünïcödé ✓", "ünïcödé ✓"),
            ("\u{1b}", ""),
        ];
        for (input, want) in cases {
            assert_eq!(sanitize(input), want, "{input:?}");
        }
    }
}
