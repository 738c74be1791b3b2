package safety

import "time"

// Fleet is what the servers report: what each serves and how each used it.
// In ScopeFleet it must list every server of every region; in ScopeLocal
// only the servers whose usage the caller has.
type Fleet struct {
	Servers []Server
}

// Server is one KMS server's report.
type Server struct {
	// Region and Name identify the server, e.g. "us-east", "kms-2".
	Region, Name string
	// Known is true when the server is reachable and its usage is known. A
	// server that is unreachable, or that lost its history and has not
	// reported since, is not Known: it counts as in use, blocking every
	// retirement and promotion it is relevant to, with no earliest time.
	Known bool
	// HistoryFrom, when not zero, is when the server's usage history starts:
	// it lost what it recorded before (a restart with a lost or fresh state
	// directory). Every version that existed before HistoryFrom counts as
	// encrypted with and used at HistoryFrom on this server.
	HistoryFrom time.Time
	// Keysets maps a keyset name to what the server serves of it and how it
	// used it. Versions it no longer serves stay listed while their usage
	// matters.
	Keysets map[string]ServedKeyset
}

// ServedKeyset is one server's view of one keyset.
type ServedKeyset struct {
	// Versions maps a key ID to its serving state and usage on the server.
	Versions map[uint32]ServedVersion
}

// ServedVersion is one version's serving state and usage on one server.
type ServedVersion struct {
	// Decrypts and Primary say what the server serves now. Primary implies
	// decrypting, whatever Decrypts says.
	Decrypts, Primary bool
	// LastEncrypt is the server's last encryption with the version, LastUse
	// its last encryption or decryption; zero means never (within
	// HistoryFrom).
	LastEncrypt, LastUse time.Time
}

// decrypting reports whether the server serves the version decrypting.
func (sv ServedVersion) decrypting() bool { return sv.Decrypts || sv.Primary }

// servesNothing reports whether the server serves no version of any keyset
// decrypting (e.g. it restarted with a fresh state directory and has not been
// pushed a bundle). Such a server answers no decrypt request, so it is not
// required to decrypt a version before that version is promoted.
func (s Server) servesNothing() bool {
	for _, sk := range s.Keysets {
		for _, sv := range sk.Versions {
			if sv.decrypting() {
				return false
			}
		}
	}
	return true
}

// Serving is what a bundle makes a server do with one version.
type Serving struct {
	// Decrypts and Primary as in ServedVersion; Primary implies decrypting.
	Decrypts, Primary bool
}

// decrypting reports whether the version decrypts.
func (s Serving) decrypting() bool { return s.Decrypts || s.Primary }

// Content is what a bundle makes a server serve: keyset name → key ID →
// Serving. A keyset or version absent from Content is not served. A nil
// Content is a server serving nothing.
type Content map[string]map[uint32]Serving
