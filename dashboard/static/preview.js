// The job page's preview: hls.js (from /static/hls.min.js) plays <video id=preview data-src>.
"use strict";
(function () {
  const video = document.getElementById("preview");
  if (!video) return;
  const src = video.dataset.src;
  if (window.Hls && Hls.isSupported()) {
    const hls = new Hls();
    hls.loadSource(src);
    hls.attachMedia(video);
    hls.on(Hls.Events.ERROR, (event, data) => {
      if (data.fatal) console.log("preview failed: " + data.type + " " + data.details);
    });
  } else {
    video.src = src;  // Safari plays HLS natively
  }
  video.play().catch(error => console.log("autoplay refused: " + error));
})();
