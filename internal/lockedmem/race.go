//go:build race

package lockedmem

// raceDetector is true in binaries built with -race. The race detector maps
// terabytes of shadow memory; mlockall(MCL_CURRENT) would try to fault all
// of it in, so [LockProcess] never locks such a binary.
const raceDetector = true
