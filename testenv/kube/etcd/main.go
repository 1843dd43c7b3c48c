// An etcd for the test API server: one member on loopback, data in the given directory.
//
//	etcd DATA_DIR CLIENT_URL PEER_URL
package main

import (
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"go.etcd.io/etcd/server/v3/embed"
)

func main() {
	if len(os.Args) != 4 {
		log.Fatal("usage: etcd DATA_DIR CLIENT_URL PEER_URL")
	}
	client, err := url.Parse(os.Args[2])
	if err != nil {
		log.Fatalf("client url: %v", err)
	}
	peer, err := url.Parse(os.Args[3])
	if err != nil {
		log.Fatalf("peer url: %v", err)
	}
	cfg := embed.NewConfig()
	cfg.Dir = os.Args[1]
	cfg.ListenClientUrls = []url.URL{*client}
	cfg.AdvertiseClientUrls = []url.URL{*client}
	cfg.ListenPeerUrls = []url.URL{*peer}
	cfg.AdvertisePeerUrls = []url.URL{*peer}
	cfg.InitialCluster = cfg.Name + "=" + peer.String()
	cfg.LogLevel = "warn"
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		log.Fatalf("starting etcd: %v", err)
	}
	defer e.Close()
	<-e.Server.ReadyNotify()
	log.Printf("etcd ready on %s", client)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-stop:
	case err := <-e.Err():
		log.Fatalf("etcd: %v", err)
	}
}
