//! Helpers shared by the iommu integration tests.

/// Merges adjacent `(iova, len)` ranges of an ordered list into runs.
pub fn runs(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(iova, len) in ranges {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == iova => last.1 += len,
            _ => out.push((iova, len)),
        }
    }
    out
}
