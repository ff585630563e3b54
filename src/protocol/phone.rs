//! Phone numbers as account names.
//!
//! An account's localpart is the E.164 number's digits without `+`
//! (`+1 555 123 4567` → `15551234567`). Parsing and validation use the
//! `phonenumber` crate (libphonenumber's metadata), so every form a user
//! might type — spaces, dashes, brackets, a national form with a default
//! region — normalises to the same account.

use phonenumber::country::Id;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PhoneError {
    #[error("not a phone number: {0:?}")]
    Unparsable(String),
    #[error("not a valid phone number for its country: {0:?}")]
    Invalid(String),
}

/// Parses a region code such as `US` or `DE`.
pub fn region(code: &str) -> Option<Id> {
    code.trim().to_ascii_uppercase().parse().ok()
}

/// Normalises `input` to E.164 digits without `+`.
///
/// A bare digit string is read as international (`15551234567`), as it
/// appears in a JID localpart. Numbers with a national prefix need
/// `default_region`.
///
/// Validation is by possible length for the country, not by assigned
/// ranges: number plans change faster than a server's metadata, and
/// fictional test ranges (555) must still work.
///
/// # Errors
/// [`PhoneError`] when the input is not a number of a known country with a
/// possible length.
pub fn normalize(input: &str, default_region: Option<Id>) -> Result<String, PhoneError> {
    let digits = normalize_once(input, default_region)?;
    // An account name must be its own normal form. libphonenumber accepts
    // lengths that exist only for local dialling (7 digits in NANP); the
    // digits of such a number read back as E.164 are another number, so
    // the same person could end up with two account names.
    match normalize_once(&format!("+{digits}"), None) {
        Ok(again) if again == digits => Ok(digits),
        _ => Err(PhoneError::Invalid(input.to_string())),
    }
}

fn normalize_once(input: &str, default_region: Option<Id>) -> Result<String, PhoneError> {
    let trimmed = input.trim();
    if trimmed.is_empty() || trimmed.len() > 40 {
        return Err(PhoneError::Unparsable(input.to_string()));
    }
    let candidate = if trimmed.bytes().all(|b| b.is_ascii_digit()) && default_region.is_none() {
        format!("+{trimmed}")
    } else {
        trimmed.to_string()
    };
    let parsed =
        phonenumber::parse(default_region, &candidate).map_err(|_| PhoneError::Unparsable(input.to_string()))?;
    if parsed.extension().is_some() {
        return Err(PhoneError::Invalid(input.to_string()));
    }
    let e164 = parsed.format().mode(phonenumber::Mode::E164).to_string();
    let digits: String = e164.chars().filter(|c| c.is_ascii_digit()).collect();
    if !(8..=15).contains(&digits.len()) {
        return Err(PhoneError::Invalid(input.to_string()));
    }
    // Possible length by any region sharing the calling code (NANP
    // shares +1 between many regions).
    let national = parsed.national().to_string();
    let national_len = national.len();
    let possible = phonenumber::metadata::DATABASE
        .by_code(&parsed.country().code())
        .map(|metas| {
            metas.iter().any(|m| {
                let general = m.descriptors().general();
                let lens = general.possible_length();
                if lens.is_empty() {
                    general.is_match(&national)
                } else {
                    lens.iter().any(|&l| l as usize == national_len)
                }
            })
        })
        .unwrap_or(false);
    if !possible {
        return Err(PhoneError::Invalid(input.to_string()));
    }
    Ok(digits)
}

/// Whether `local` is already a normalised account localpart.
pub fn is_account_local(local: &str) -> bool {
    (8..=15).contains(&local.len()) && local.bytes().all(|b| b.is_ascii_digit()) && !local.starts_with('0')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_forms() {
        for s in ["+1 555 123 4567", "15551234567", "+1 (555) 123-4567", "+15551234567"] {
            assert_eq!(normalize(s, None).unwrap(), "15551234567", "{s}");
        }
        assert_eq!(normalize("(555) 123-4567", region("US")).unwrap(), "15551234567");
        assert_eq!(normalize("030 1234567", region("de")).unwrap(), "49301234567");
        assert_eq!(normalize("+44 20 7946 0958", None).unwrap(), "442079460958");
    }

    #[test]
    fn rejects_garbage() {
        for s in ["", "hello", "+1", "12", "+999 123", "+1 555 123 4567 ext 5", &"9".repeat(50)] {
            assert!(normalize(s, None).is_err(), "{s}");
        }
        assert!(is_account_local("15551234567"));
        assert!(!is_account_local("alice"));
    }

    /// Found by fuzzing: a 7-digit NANP local number was accepted as
    /// `1` + 7 digits, which reads back as a different number.
    #[test]
    fn local_only_lengths_are_not_account_names() {
        assert!(normalize("34556*45", region("US")).is_err());
        assert!(normalize("345 5645", region("US")).is_err());
        assert_eq!(normalize("(555) 123-4567", region("US")).as_deref(), Ok("15551234567"));
    }
}
