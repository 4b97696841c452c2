//! A vector whose first `N` elements live inline: the per-request lists on the I/O path
//! (a request's buffers, a chain's segments, a transfer's iovecs) usually hold one or two
//! entries, and building them then allocates nothing. Beyond `N` everything moves to a `Vec`.

/// Up to `N` elements inline, more on the heap. `filler` only occupies unused inline slots.
#[derive(Debug, Clone)]
pub struct InlineVec<T: Copy, const N: usize> {
    inline: [T; N],
    inline_len: usize,
    /// All the elements instead, once there were more than `N`.
    spilled: Vec<T>,
}

impl<T: Copy, const N: usize> InlineVec<T, N> {
    pub const fn new(filler: T) -> Self {
        InlineVec {
            inline: [filler; N],
            inline_len: 0,
            spilled: Vec::new(),
        }
    }

    pub fn push(&mut self, value: T) {
        if !self.spilled.is_empty() {
            self.spilled.push(value);
        } else if self.inline_len < N {
            self.inline[self.inline_len] = value;
            self.inline_len += 1;
        } else {
            self.spilled.reserve(N * 2);
            self.spilled.extend_from_slice(&self.inline);
            self.spilled.push(value);
        }
    }
}

impl<T: Copy, const N: usize> std::ops::Deref for InlineVec<T, N> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        if self.spilled.is_empty() {
            &self.inline[..self.inline_len]
        } else {
            &self.spilled
        }
    }
}

impl<T: Copy, const N: usize> std::ops::DerefMut for InlineVec<T, N> {
    fn deref_mut(&mut self) -> &mut [T] {
        if self.spilled.is_empty() {
            &mut self.inline[..self.inline_len]
        } else {
            &mut self.spilled
        }
    }
}

#[cfg(test)]
mod tests {
    use super::InlineVec;

    #[test]
    fn elements_keep_their_order_inline_and_after_spilling() {
        let mut v: InlineVec<u32, 2> = InlineVec::new(0);
        v.push(1);
        v.push(2);
        assert_eq!(&v[..], &[1, 2]);
        v.push(3);
        v.push(4);
        assert_eq!(&v[..], &[1, 2, 3, 4]);
        v[0] = 9;
        assert_eq!(v[0], 9);
    }
}
