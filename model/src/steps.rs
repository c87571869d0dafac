//! [`steps!`]: the unrolled loop of the guest's kernels and packing.

/// Runs `$step!($($args)* i0, j)` for each `i0 + j` in `0..$k` (`$args`, with its trailing
/// comma, for a step macro defined outside the loop's function), 32 steps per loop iteration (`i0`
/// the iteration's first step, `j` a literal from 0 to 31), each followed by its own
/// exit test: the exits are where Cranelift must have every accumulator computed, so it
/// computes them step by step, in registers (with one test per iteration it would load
/// all the iteration's operands first and compute each accumulator's whole chain in
/// turn). The test compares the steps left at the iteration's start with a constant: one
/// `cmp` and a branch, which the core fuses. Testing `i0 + j + 1 == k` cost two more
/// instructions per step, where a step of `half_spread` has 22 others (3-4% of ResNet-50).
/// Written out, not a `for` loop: a loop LLVM does not unroll at the guest's size-optimized
/// level would be a wasm loop, with an epoch check per step. A step that
/// addresses its operands as `p.add(i0 * w).add(j * w)` gets one address computation
/// per iteration and constant offsets, which wasm loads carry and Cranelift folds into
/// the x86 addressing mode (an index computed per step cost five integer instructions).
macro_rules! steps {
    ($k:expr, $step:ident) => {
        steps!($k, $step, [])
    };
    ($k:expr, $step:ident, [$($args:tt)*]) => {{
        let k: usize = $k;
        let mut i0 = 0;
        let mut left = k;
        if k > 0 {
            'steps: loop {
                macro_rules! then_test {
                    ($j:literal) => {
                        $step!($($args)* i0, $j);
                        if left == $j + 1 {
                            break 'steps;
                        }
                    };
                }
                then_test!(0);
                then_test!(1);
                then_test!(2);
                then_test!(3);
                then_test!(4);
                then_test!(5);
                then_test!(6);
                then_test!(7);
                then_test!(8);
                then_test!(9);
                then_test!(10);
                then_test!(11);
                then_test!(12);
                then_test!(13);
                then_test!(14);
                then_test!(15);
                then_test!(16);
                then_test!(17);
                then_test!(18);
                then_test!(19);
                then_test!(20);
                then_test!(21);
                then_test!(22);
                then_test!(23);
                then_test!(24);
                then_test!(25);
                then_test!(26);
                then_test!(27);
                then_test!(28);
                then_test!(29);
                then_test!(30);
                then_test!(31);
                i0 += 32;
                left -= 32;
            }
        }
    }};
}
