//! Deterministic test texts: ASCII and CJK, where every `char` is exactly
//! one extended grapheme cluster (no combining marks, no CR/LF, no Hangul
//! jamo), so "one delta per character" means the same thing for tokengate
//! (graphemes) and for the reference server (`char`s).

const ASCII: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;!?-'()";

/// `chars` characters, about one in four a CJK ideograph, seeded so that
/// every stream can get its own text.
pub fn generate(chars: usize, seed: u64) -> String {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = move || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut out = String::with_capacity(chars * 2);
    for i in 0..chars {
        let r = next();
        if r % 4 == 0 {
            // CJK Unified Ideographs U+4E00..U+9FA5.
            let c = char::from_u32(0x4E00 + ((r >> 8) % 0x51A6) as u32).unwrap_or('字');
            out.push(c);
        } else {
            let mut b = ASCII[((r >> 8) % ASCII.len() as u64) as usize];
            // No space at the ends (nothing trims them today, but a prompt
            // that starts or ends with one is an invitation to).
            if b == b' ' && (i == 0 || i + 1 == chars) {
                b = b'x';
            }
            out.push(b as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::generate;

    #[test]
    fn length_and_mix() {
        let t = generate(2000, 7);
        assert_eq!(t.chars().count(), 2000);
        let cjk = t.chars().filter(|c| !c.is_ascii()).count();
        assert!((300..700).contains(&cjk), "{cjk}");
        assert!(!t.contains('\r') && !t.contains('\n'));
        assert_eq!(generate(50, 1), generate(50, 1));
        assert_ne!(generate(50, 1), generate(50, 2));
    }
}
