package chain

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

// The demo team and its keysets.
const (
	demoTeam    = "demo"
	notesKeyset = "demo/notes"
	blobsKeyset = "demo/blobs"
)

// demoKeysets are the demo team's keysets, each served in every region.
var demoKeysets = []string{notesKeyset, blobsKeyset}

// KeyURI is the Tink key URI of keyset in region: cairn-kms://<region>/<keyset>.
func KeyURI(region, keyset string) string { return "cairn-kms://" + region + "/" + keyset }

// teamFile is the demo team's config, regionctl's team file format
// (regionctl/config).
type teamFile struct {
	Team    string       `json:"team"`
	Keysets []teamKeyset `json:"keysets"`
}

type teamKeyset struct {
	Name           string   `json:"name"`
	Regions        []string `json:"regions"`
	Purpose        string   `json:"purpose"`
	RotationPeriod string   `json:"rotation_period"`
	CiphertextTTL  string   `json:"ciphertext_ttl"`
	ACL            teamACL  `json:"acl"`
}

type teamACL struct {
	Encrypt         []string `json:"encrypt"`
	Decrypt         []string `json:"decrypt"`
	GenerateDataKey []string `json:"generate_data_key"`
	Rewrap          []string `json:"rewrap"`
}

// demoTeamFile returns the demo team: demo/notes and demo/blobs, both in
// every region, both open to the clients of every region of the chain
// (client/<region>/* for each region, so no identity outside the chain's
// regions).
//
// Cross-region decryption is allowed on purpose. A keyset's ACL is one list
// for all its regions (regionctl has no per-region ACL), and a keyset's key
// material is the same in each of its regions (the root KMS makes it once
// and encrypts it under each region's key), so a ciphertext made in us-east
// opens in eu-west. Allowing it is what lets data replicated between regions
// be read where it lands and lets a client fall back to another region; the
// demo shows it. A keyset that must stay in one region is listed in that
// region only.
//
// demo/notes allows encrypt and decrypt (what the Tink AEAD calls).
// demo/blobs also allows generate_data_key, for blob stores that have the
// KMS make their data keys.
func demoTeamFile(regions []string) teamFile {
	var clients []string
	for _, r := range regions {
		clients = append(clients, "client/"+r+"/*")
	}
	keyset := func(name string, gdk bool) teamKeyset {
		k := teamKeyset{
			Name: name, Regions: regions, Purpose: "envelope",
			RotationPeriod: "2160h", CiphertextTTL: "8760h",
			ACL: teamACL{Encrypt: clients, Decrypt: clients, GenerateDataKey: []string{}, Rewrap: []string{}},
		}
		if gdk {
			k.ACL.GenerateDataKey = clients
		}
		return k
	}
	return teamFile{Team: demoTeam, Keysets: []teamKeyset{keyset(notesKeyset, false), keyset(blobsKeyset, true)}}
}

// writeDemoTeam writes the demo team file into dir.
func writeDemoTeam(dir string, regions []string) error {
	data, err := json.MarshalIndent(demoTeamFile(regions), "", "  ")
	if err != nil {
		return fmt.Errorf("chain: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("chain: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, demoTeam+".json"), append(data, '\n'), 0o644); err != nil {
		return fmt.Errorf("chain: %w", err)
	}
	return nil
}
