//go:build !race

package lockedmem

// raceDetector is true in binaries built with -race (see race.go).
const raceDetector = false
